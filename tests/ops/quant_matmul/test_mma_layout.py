"""The CUDA GEMV's mma layout on the CPU: exact round trip, and the kernel's lane-level decoding (replayed by
mma_emulator.py with the kernel's own masks, magic number and fp16 arithmetic) against float64 products,
through to_decode_weight for sorted and act-order checkpoints in both zero conventions. The kernel runs in
the GPU tier (test_quant_matmul_gpu.py); its SASS is counted by tests/test_cuda_compile_tier.py."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from helpers import randn
from mma_emulator import HIGH_FIELDS, KERNEL_FIELDS, emulate
from mma_emulator import _zero_constants as emulator_zero_constants
from qmm_helpers import CUDA_GEMV_CASES, CUDA_GEMV_K, cuda_gemv_checkpoint, random_checkpoint

import maca_kernels as mk
from maca_kernels._triton_utils import INTERPRETING
from maca_kernels.ops.quant_matmul import cuda_kernel
from maca_kernels.ops.quant_matmul.mma_layout import (
    KERNEL_GROUPS,
    PREFETCH,
    VEC_K,
    pack_mma,
    supports,
    unpack_mma,
)

CASES = [  # (bits, N, K, group_size): odd column counts, one group and grouped, several tiles of K
    (4, 80, 256, 128), (4, 48, 512, 64), (4, 112, 320, 32), (4, 64, 192, -1), (3, 96, 256, 128), (3, 32, 384, -1),
    (2, 80, 256, 128), (2, 16, 640, -1),
]


def rel(y, want):
    return float(np.abs(y - want).max() / np.abs(want).max())


@pytest.mark.parametrize("bits,N,K,group_size", CASES)
def test_round_trip_is_exact(bits, N, K, group_size):
    g = torch.Generator().manual_seed(bits * N + K)
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    zeros = torch.randint(0, 2**bits + 1, (N, G), generator=g)  # v1 checkpoints can hold a zero of 2^bits
    scales = (torch.rand(N, G, generator=g) + 0.5).half()
    w = pack_mma(codes, zeros, scales, bits, group_size)
    assert w.words.dtype == torch.int32 and w.scales.shape == (-(-N // 64) * 4, G, 16) == w.zeros.shape
    c, z, s = unpack_mma(w)
    assert torch.equal(c, codes.int()) and torch.equal(z, zeros.int()) and torch.equal(s, scales)


@pytest.mark.parametrize("bits,N,K,group_size", CASES)
@pytest.mark.parametrize("act_order", [False, True], ids=["sorted", "act_order"])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_kernel_matches_float64(bits, N, K, group_size, act_order, fmt, dtype):
    W, qw, sc, qz, g_idx = random_checkpoint(N, K, bits, group_size, act_order and group_size != -1,
                                             seed=bits + N + K, convention=fmt)
    d = mk.to_decode_weight(qw, sc, qz, g_idx, bits, group_size, fmt, mma=True)
    assert d.mma is not None and d.mma.N == N and d.mma.K == K
    for M in (1, 3, 8, 11, 16):  # above 8: the _m16 kernels (two mma's per decoded fragment)
        x = randn(M, K, dtype=dtype, seed=M)  # in input order: the kernel gathers it by d.mma.perm
        y = emulate(x.double().numpy(), d.mma, bf16=dtype == torch.bfloat16)
        # exact products and float64 sums: only the float64 rounding of the reference remains
        assert rel(y, (x.double() @ W.T).numpy()) <= 1e-12


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _branch_registers(body: str, bf16: bool) -> list[tuple]:
    """(op, shift, mask, magic name, scale, k index, high (shift, mask) or None) per register a0..a3, read
    from one branch of tile_mma: locals resolved, scale constants decoded as fp16 / bf16."""
    defs = {}
    for decl in re.findall(r"(?:const )?u32 ((?:\w+ = [^;]+));", body):
        for item in _split_top(decl):
            name, expr = item.split(" = ", 1)
            defs[name.strip()] = expr.strip()
    high_ors = re.findall(r"(t\d) = lop_or\((c(?: >> \d+)?), (0x[0-9A-Fa-f]+)u, t\d\);", body)
    high = {t: (src, int(m, 16)) for t, src, m in high_ors}

    def shift_of(src: str) -> int:
        src = defs.get(src, src)
        return int(src.split(">>")[1]) if ">>" in src else 0

    def value(name: str) -> float:
        half = int(defs[name].rstrip("u"), 16) & 0xFFFF
        return float(np.array([half], np.uint16).view(np.float16)[0]) if not bf16 else \
            float(np.array([half << 16], np.uint32).view(np.float32)[0])

    out = []
    for r in range(4):
        fn, args = re.search(rf"a{r} = (\w+)\((.*)\);", body).groups()
        args = _split_top(args)
        lop = defs.get(args[0], args[0])
        src, mask, magic = _split_top(re.fullmatch(r"lop_or\((.*)\)", lop).group(1))
        scale = 1.0 if fn == "hsub2" else value(args[1])
        k = int(re.fullmatch(r"z\.k(\d)", args[-1]).group(1))
        hi = high.get(args[0])
        hi = None if hi is None else (shift_of(hi[0]), hi[1])
        out.append((fn, shift_of(src), int(mask.rstrip("u"), 16), magic, scale, k, hi))
    return out


def _zeros_formulas(src: str, bits: int, bf16: bool):
    """The Zeros<bits, bf16> constructor as Python: (zg, zg8) -> [k0, k1, k2, k3]."""
    body = src[src.index("struct Zeros {"):]
    body = body[: body.index("};")]
    branch = body.split("} else {")[0 if bf16 else 1]
    lines = [ln.split("//")[0].strip() for ln in branch.splitlines() if re.match(r"\s*k\d = ", ln)]

    def to_py(expr: str) -> str:
        expr = re.sub(r"(0x[0-9A-Fa-f]+|\d+)u\b", r"\1", expr).replace("pair(", "_pair(")
        return re.sub(r"BITS == 4 \? ([^:]+) : (.+)", r"((\1) if BITS == 4 else (\2))", expr)

    def run(zg, zg8):
        env = {"BITS": bits, "zg": zg, "zg8": zg8, "_pair": lambda h: (h & 0xFFFF) | ((h & 0xFFFF) << 16)}
        for ln in lines:
            name, expr = ln.rstrip(";").split(" = ", 1)
            env[name] = eval(to_py(expr), {}, env)  # noqa: S307 - our own source, a handful of integer formulas
        return [env[f"k{i}"] for i in range(4)]

    return run


def test_kernel_source_matches_the_emulator():
    """The emulator replays the .cu's decode: every register's operation, shift, mask, magic number, scale,
    zero constant and high-bit source, for fp16 and bf16, and the mma's operand type must agree."""
    src = cuda_kernel.SOURCE.read_text()
    body = src[src.index("MACA_DEVICE void tile_mma("):]
    body = body[: body.index("mma16816<BF16>")]
    branches = body.split("} else if constexpr")
    bf16_int23 = branches[2][branches[2].index("} else {"):]
    tables = {(4, False): branches[0], (2, False): branches[1], (4, True): branches[2].split("} else {")[0],
              (2, True): bf16_int23}
    for bits in (4, 3, 2):
        for bf16 in (False, True):
            regs = _branch_registers(tables[(4 if bits == 4 else 2, bf16)], bf16)
            zeros = _zeros_formulas(src, bits, bf16)
            for r, (fn, shift, mask, magic, scale, k, hi) in enumerate(regs):
                want_shift, want_mask, want_scale = KERNEL_FIELDS[(4 if bits == 4 else 2, bf16)][r]
                assert (shift, mask, scale) == (want_shift, want_mask, want_scale), (bits, bf16, r)
                assert magic == ("kMagicBf16" if bf16 else "kMagic"), (bits, bf16, r)
                assert fn == ("bfma2" if bf16 else "hsub2" if want_scale == 1.0 and r % 2 == 0 else "hfma2")
                if bits == 3:
                    assert hi == HIGH_FIELDS[bf16][r], (bf16, r)
                for zg, zg8 in ((0, 0), (1, 2), (2**bits, 2**bits - 1), (3, 2**bits)):
                    want = emulator_zero_constants(bits, bf16, np.array(zg), np.array(zg8))[r]
                    assert zeros(zg, zg8)[k] == int(want), (bits, bf16, r, zg, zg8)
    for name, value in (("kMagic", 0x64006400), ("kMagicBf16", 0x43004300)):
        assert f"{name} = {hex(value).replace('0x', '0x').upper().replace('0X', '0x')}u" in src
    mma = src[src.index("MACA_DEVICE void mma16816("):]
    mma_bf16, mma_fp16 = mma[: mma.index("} else {")], mma[mma.index("} else {"): mma.index("\n}\n")]
    assert "f32.bf16.bf16.f32" in mma_bf16 and "f32.f16.f16.f32" in mma_fp16


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_emulated_kernel_at_the_extreme_zero_points(bits):
    """Zero points 0 and 2^bits (a v1 checkpoint's all-ones field), where the constants change binade."""
    N, K, group = 64, 256, 128
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    zeros = torch.tensor([0, 2**bits])[torch.randint(0, 2, (N, K // group), generator=g)]
    scales = (torch.rand(N, K // group, generator=g) + 0.5).half()
    w = pack_mma(codes, zeros, scales, bits, group)
    gi = torch.arange(K) // group
    W = (codes - zeros[:, gi]).double() * scales.double()[:, gi]
    for dtype in (torch.float16, torch.bfloat16):
        x = randn(5, K, dtype=dtype, seed=bits)
        y = emulate(x.double().numpy(), w, bf16=dtype == torch.bfloat16)
        assert rel(y, (x.double() @ W.T).numpy()) <= 1e-12


def test_supported_shapes_and_errors():
    assert supports(4, 128, 4096, 4096) and supports(4, 64, 4096, 11008) and supports(2, -1, 256, 8)
    assert not supports(8, 128, 4096, 4096) and not supports(3, 64, 4096, 4096) and not supports(2, 128, 4160, 64)
    W, qw, sc, qz, _ = random_checkpoint(64, 256, 3, 64, False, seed=1)
    with pytest.raises(ValueError, match="no kernel for bits=3, group_size=64"):
        mk.to_decode_weight(qw, sc, qz, None, 3, 64, mma=True)
    with pytest.raises(ValueError, match="scales must be float16"):
        pack_mma(torch.zeros(64, 256, dtype=torch.int32), torch.zeros(64, 2, dtype=torch.int32),
                 torch.ones(64, 2), 4, 128)
    d = mk.to_decode_weight(qw, sc, qz, None, 3, 64)
    with pytest.raises(ValueError, match="needs the mma layout"):
        d.matmul(randn(1, 256, dtype=torch.float16, seed=2), backend="cuda")
    W, qw, sc, qz, _ = random_checkpoint(64, 256, 4, 128, False, seed=3)
    d = mk.to_decode_weight(qw, sc, qz, None, 4, 128, mma=True)
    if not torch.cuda.is_available() and not INTERPRETING:  # (interpreted, the Triton kernels on the layout run)
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            d.matmul(randn(1, 256, dtype=torch.float16, seed=4), backend="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        d.matmul(randn(17, 256, seed=4), backend="cuda")


def test_quant_linear_opt_in_builds_the_layout_and_keeps_state_dict_clean():
    W, qw, sc, qz, g_idx = random_checkpoint(80, 256, 4, 128, True, seed=5)
    tensors = {"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}
    layer = mk.QuantLinear.from_checkpoint(tensors, 4, 128).enable_cuda_gemv()
    assert layer.cuda_gemv and set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
    x = randn(1, 256, dtype=torch.float16, seed=6)
    # the layout holds the layer's own (group-ordered) weight: the emulated kernel gives its product
    assert torch.equal(layer._mma().perm.long(), layer.perm)  # the kernel gathers x itself
    y = emulate(x.double().numpy(), layer._mma())
    assert rel(y, (x.double() @ W.T).numpy()) <= 1e-12
    # one packed copy (the layout's); the state dict repacks the checkpoint bit for bit
    assert layer.qweight.numel() == 0 and torch.equal(layer.state_dict()["qweight"], qw)
    if not INTERPRETING:  # CPU inputs need the checkpoint layout back (the C++ kernel reads it)
        with pytest.raises(ValueError, match=r"enable_cuda_gemv\(False\)"):
            layer(x)
    # new weights rebuild the layout; opting out restores the checkpoint layout and the CPU path
    W2, qw2, sc2, qz2, g2 = random_checkpoint(80, 256, 4, 128, True, seed=7)
    layer.load_state_dict({"qweight": qw2, "scales": sc2, "qzeros": qz2, "g_idx": g2})
    assert rel(emulate(x.double().numpy(), layer._mma()), (x.double() @ W2.T).numpy()) <= 1e-12
    assert not layer.enable_cuda_gemv(False).cuda_gemv
    assert torch.equal(layer.state_dict()["qweight"], qw2) and layer.qweight.shape == qw2.shape
    assert rel(layer(x.float()).double().numpy(), (x.double() @ W2.T).numpy()) <= 1e-5
    with pytest.raises(ValueError, match="no kernel for bits=8"):
        mk.QuantLinear(256, 64, bits=8, group_size=128).enable_cuda_gemv()


def test_quant_linear_cuda_gemv_survives_casts_and_failed_reloads():
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, 4, 128, True, seed=30)
    layer = mk.QuantLinear.from_checkpoint({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}, 4, 128)
    layer.enable_cuda_gemv()
    scales = layer._mma().scales.clone()
    layer.bfloat16().float()  # module-wide casts leave what the kernel reads alone
    assert layer._mma().scales.dtype == torch.float16 and torch.equal(layer._mma().scales, scales)
    layer = mk.QuantLinear.from_checkpoint({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}, 4, 128)
    layer.enable_cuda_gemv()
    uneven = torch.cat([torch.zeros(1), torch.ones(255)]).to(torch.int32)  # groups of 1 and 255 rows
    with pytest.raises(RuntimeError, match="groups of one size"):  # with the other modules' errors, at the end
        layer.load_state_dict({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": uneven})
    assert not layer.cuda_gemv  # no stale layout left behind
    assert torch.equal(layer.state_dict()["qweight"], qw) and torch.equal(layer.state_dict()["g_idx"], uneven)


@pytest.mark.parametrize("bits,group_size,K", [(4, 128, 4096), (4, 64, 4160), (4, 32, 2176), (4, -1, 8192),
                                              (3, 128, 14336), (2, 128, 4224), (2, -1, 1024), (3, 128, 128)])
@pytest.mark.parametrize("N,n_sms", [(4096, 132), (28672, 132), (64, 132), (1024, 132), (14336, 108)])
def test_slicing_keeps_the_sms_busy_with_whole_groups(bits, group_size, K, N, n_sms):
    """The launcher's warps per CTA: ranges of K of whole groups and loads, none empty, about WARPS_PER_SM warps
    per SM where the columns alone give fewer, at most MAX_SLICES; one warp when deterministic."""
    W, qw, sc, qz, _ = random_checkpoint(64, K, bits, group_size, False, seed=K)
    w = mk.to_decode_weight(qw, sc, qz, None, bits, group_size, mma=True).mma
    w = dataclasses.replace(w, N=N)  # the slicing reads N and K only
    slices, k_slice = cuda_kernel.slicing(w, n_sms)
    unit = math.lcm(VEC_K[bits], w.group_size) if w.kernel_group else VEC_K[bits]
    assert k_slice % unit == 0 and 1 <= slices <= cuda_kernel.MAX_SLICES
    assert (slices - 1) * k_slice < K <= slices * k_slice  # every warp has work
    aim = max(1, min(cuda_kernel.MAX_SLICES, round(cuda_kernel.WARPS_PER_SM * n_sms / -(-N // 16))))
    assert slices <= aim and (k_slice == unit or -(-K // (k_slice - unit)) > aim)  # the finest split within it
    assert cuda_kernel.slicing(w, n_sms, deterministic=True) == (1, -(-K // unit) * unit)


def test_every_kernel_name_is_in_the_source():
    src = cuda_kernel.SOURCE.read_text()
    for bits, groups in KERNEL_GROUPS.items():
        for group in (0, *groups):
            for bf16 in (False, True):
                for rows in (1, 8, 9, 16):
                    base = cuda_kernel.kernel_name(bits, group, bf16, 1)
                    assert f"MACA_GEMV_MMA_ROWS({base}, {bits}, {group}, {'true' if bf16 else 'false'})" in src
                    assert cuda_kernel.kernel_name(bits, group, bf16, rows) == base + ("_m16" if rows > 8 else "")
    assert f"kLoads = MT == 1 ? {PREFETCH} : {PREFETCH // 2};" in src
    assert f"kMaxSlices = {cuda_kernel.MAX_SLICES};" in src


def test_enable_cuda_gemv_on_a_model_switches_the_layers_it_has_kernels_for():
    """mk.enable_cuda_gemv(model): every QuantLinear with a kernel (here int4 g32 act-order and int3 g128),
    not the others (8 bits, int3 g64); each switched layer's layout gives its product (emulated)."""
    layers = {}
    for name, (bits, group, act) in {"a": (4, 32, True), "b": (3, 128, False), "c": (8, 128, False),
                                     "d": (3, 64, False)}.items():
        W, qw, sc, qz, g_idx = random_checkpoint(96, 256, bits, group, act, seed=40 + bits + group)
        tensors = {"qweight": qw, "scales": sc, "qzeros": qz} | ({"g_idx": g_idx} if act else {})
        layers[name] = (mk.QuantLinear.from_checkpoint(tensors, bits, group), W)
    model = torch.nn.ModuleDict({n: layer for n, (layer, _) in layers.items()})
    assert mk.enable_cuda_gemv(model) == ["a", "b"]
    assert [model[n].cuda_gemv for n in "abcd"] == [True, True, False, False]
    x = randn(3, 256, dtype=torch.float16, seed=41)
    for n in "ab":
        assert rel(emulate(x.double().numpy(), model[n]._mma()), (x.double() @ layers[n][1].T).numpy()) <= 1e-12
    assert set(mk.enable_cuda_gemv(model, False)) == set("abcd") and not any(model[n].cuda_gemv for n in "abcd")


@pytest.mark.parametrize("bits,group_size", CUDA_GEMV_CASES)
def test_the_gpu_tests_cases_on_the_emulator(bits, group_size):
    """test_quant_matmul_gpu.py::test_cuda_gemv_matches_float64's inputs, built and run on the emulator here:
    a setup mistake in the GPU tier (which cannot run on these machines) fails on the CPU first."""
    for act_order in (False, True):
        W, qw, sc, qz, g_idx = cuda_gemv_checkpoint(bits, group_size, act_order)
        d = mk.to_decode_weight(qw, sc, qz, g_idx, bits, group_size, mma=True)
        for M in (1, 16):
            x = randn(M, CUDA_GEMV_K, dtype=torch.float16, seed=M)
            assert rel(emulate(x.double().numpy(), d.mma), (x.double() @ W.T).numpy()) <= 1e-12
