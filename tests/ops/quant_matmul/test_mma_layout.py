"""The CUDA GEMV's mma layout on the CPU: exact round trip, and the kernel's lane-level decoding (replayed by
mma_emulator.py with the kernel's own masks, magic number and fp16 arithmetic) against float64 products,
through to_decode_weight for sorted and act-order checkpoints in both zero conventions. The kernel runs in
the GPU tier (test_quant_matmul_gpu.py); its SASS is counted by tests/test_cuda_compile_tier.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import randn
from mma_emulator import HIGH_FIELDS, KERNEL_FIELDS, emulate
from qmm_helpers import random_checkpoint

import maca_kernels as mk
from maca_kernels.ops.quant_matmul import cuda_kernel
from maca_kernels.ops.quant_matmul.mma_layout import pack_mma, supports, unpack_mma

CASES = [  # (bits, N, K, group_size): odd column counts, one group and grouped, several tiles of K
    (4, 80, 256, 128), (4, 48, 512, 64), (4, 64, 192, -1), (3, 96, 256, 128), (3, 32, 384, -1),
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
    assert w.words.dtype == torch.int32 and w.scales.shape == (G + 1, -(-N // 64) * 64)
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
    for M in (1, 3, 8):
        x = randn(M, K, dtype=dtype, seed=M)
        xp = x if d.perm is None else x[:, d.perm]  # DecodeWeight.matmul gathers x the same way
        y = emulate(xp.double().numpy(), d.mma, bf16=dtype == torch.bfloat16)
        # exact products and float64 sums: only the float64 rounding of the reference remains
        assert rel(y, (x.double() @ W.T).numpy()) <= 1e-12


def _lops(body: str) -> list[tuple[int, int]]:
    """(right shift, mask) of every ``lop_or(v…, mask, magic)`` in a stretch of the .cu source."""
    out = []
    for src, mask in re.findall(r"lop_or\((\w+(?: >> \d+)?), (0x[0-9A-Fa-f]+)u, kMagic", body):
        out.append((int(src.split(">>")[1]) if ">>" in src else 0, int(mask, 16)))
    return out


def test_kernel_source_uses_the_emulated_constants():
    """The emulator replays the .cu's decode; keep the two in step (shifts and masks in source order)."""
    src = cuda_kernel.SOURCE.read_text()
    body = src[src.index("MACA_DEVICE void tile_mma("):]
    body = body[: body.index("mma16816<BF16>")]
    branches = body.split("} else if constexpr")
    fp16_int4, fp16_int23 = branches[0], branches[1]
    bf16_int4 = branches[2]
    bf16_int23 = bf16_int4[bf16_int4.index("} else {"):]
    bf16_int4 = bf16_int4[: bf16_int4.index("} else {")]
    # fp16 int4 reads hi = v >> 8 for a2, a3
    assert [(s or 0, m) for s, m in _lops(fp16_int4.replace("hi,", "v >> 8,"))] == [
        (s, m) for s, m, _ in KERNEL_FIELDS[(4, False)]]
    assert _lops(fp16_int23) == [(s, m) for s, m, _ in KERNEL_FIELDS[(2, False)]]
    assert _lops(bf16_int4.replace("kMagicBf16", "kMagic")) == [(s, m) for s, m, _ in KERNEL_FIELDS[(4, True)]]
    assert _lops(bf16_int23.replace("v2,", "v >> 2,").replace("kMagicBf16", "kMagic")) == [
        (s, m) for s, m, _ in KERNEL_FIELDS[(2, True)]]
    for part, bf16 in ((fp16_int23, False), (bf16_int23, True)):
        high = re.findall(r"lop_or\((c(?: >> \d+)?), (0x[0-9A-Fa-f]+)u, t\d\)", part)
        assert [(int(c.split(">>")[1]) if ">>" in c else 0, int(m, 16)) for c, m in high] == HIGH_FIELDS[bf16]
    assert "kMagic = 0x64006400u" in src and "kMagicBf16 = 0x43004300u" in src
    for const in ("pair(0x6400u + zg)", "0xD400u + zg8 * 16u", "0xDC00u + zg8 * 4u", "pair(0xCC00u + zg8 * 64u)",
                  "pair(0xC300u + zg)", "0xC200u + zg8 * 4u", "pair(0xC100u + zg * 16u)", "pair(0xC100u + zg8 * 16u)"):
        assert const in src, const


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
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            d.matmul(randn(1, 256, dtype=torch.float16, seed=4), backend="cuda")


def test_quant_linear_opt_in_builds_the_layout_and_keeps_state_dict_clean():
    W, qw, sc, qz, g_idx = random_checkpoint(80, 256, 4, 128, True, seed=5)
    tensors = {"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}
    layer = mk.QuantLinear.from_checkpoint(tensors, 4, 128).enable_cuda_gemv()
    assert layer.cuda_gemv and set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
    x = randn(1, 256, dtype=torch.float16, seed=6)
    # the layout holds the layer's own (group-ordered) weight: the emulated kernel gives its product
    y = emulate(x[:, layer.perm].double().numpy(), layer._mma())
    assert rel(y, (x.double() @ W.T).numpy()) <= 1e-12
    # CPU inputs keep the default path; new weights rebuild the layout; opting out drops it
    assert rel(layer(x.float()).double().numpy(), (x.double() @ W.T).numpy()) <= 1e-5
    W2, qw2, sc2, qz2, g2 = random_checkpoint(80, 256, 4, 128, True, seed=7)
    layer.load_state_dict({"qweight": qw2, "scales": sc2, "qzeros": qz2, "g_idx": g2})
    assert rel(emulate(x[:, layer.perm].double().numpy(), layer._mma()), (x.double() @ W2.T).numpy()) <= 1e-12
    assert not layer.enable_cuda_gemv(False).cuda_gemv
    with pytest.raises(ValueError, match="no kernel for bits=8"):
        mk.QuantLinear(256, 64, bits=8, group_size=128).enable_cuda_gemv()
