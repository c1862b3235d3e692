"""The Triton kernels on the CUDA GEMV's mma layout (``launch_mma_matmul``; interpreter tier): every schedule
against float64 on the layout built from random checkpoints, and ``QuantLinear`` keeping only that layout
once the CUDA GEMV is enabled (batches above 16 rows run these kernels; the checkpoint comes back bit for
bit)."""

from __future__ import annotations

import pytest
import torch
from helpers import randn
from qmm_helpers import CUDA_GEMV_CASES, CUDA_GEMV_K, MMA_TRITON_RUNS, random_checkpoint

import maca_kernels as mk
from maca_kernels._triton_utils import INTERPRETING
from maca_kernels.nn.quant_linear import checkpoint_qweights_on
from maca_kernels.ops.quant_matmul.mma_layout import KERNEL_GROUPS, PREFETCH, supports

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="interpreter tier (TRITON_INTERPRET=1)")

CASES = [  # (bits, N, K, group_size): N not a multiple of the tiles, one group and grouped, act-order
    (4, 80, 256, 128, False), (4, 48, 384, 64, True), (4, 112, 256, 32, True), (4, 40, 192, -1, False),
    (3, 96, 256, 128, True), (3, 32, 384, -1, False), (2, 80, 512, 128, True), (2, 16, 256, -1, False),
]


def rel(y, want):
    return ((y.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("bits,N,K,group_size,act_order", CASES)
@pytest.mark.parametrize("M", [1, 16, 70])  # GEMV, small-M and large-M schedules
def test_every_schedule_matches_float64(bits, N, K, group_size, act_order, M, monkeypatch):
    empty = torch.empty

    def poisoned(*args, **kwargs):  # outputs the kernel leaves unwritten (the permuted columns) show up as NaN
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    W, qw, sc, qz, g_idx = random_checkpoint(N, K, bits, group_size, act_order, seed=bits * K + N + M,
                                             convention="gptq" if M != 16 else "gptq_v2")
    d = mk.to_decode_weight(qw, sc, qz, g_idx, bits, group_size, "gptq" if M != 16 else "gptq_v2", mma=True)
    assert (d.mma.perm is not None) == act_order
    from maca_kernels.ops.quant_matmul.triton_kernel import launch_mma_matmul

    for dtype, deterministic in ((torch.float16, False), (torch.bfloat16, True)):
        x = randn(M, K, dtype=dtype, seed=M + 1)
        want = x.double() @ W.T
        y = launch_mma_matmul(x, d.mma, deterministic=deterministic)
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel(y, want) <= (2e-3 if dtype == torch.float16 else 1e-2), (dtype, deterministic)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, True), (3, 128, False), (2, -1, False)])
def test_quant_linear_keeps_one_packed_copy(bits, group_size, act_order):
    W, qw, sc, qz, g_idx = random_checkpoint(128, 256, bits, group_size, act_order, seed=bits)
    tensors = {"qweight": qw, "scales": sc, "qzeros": qz} | ({"g_idx": g_idx} if act_order else {})
    layer = mk.QuantLinear.from_checkpoint(tensors, bits, group_size).enable_cuda_gemv()
    assert layer.cuda_gemv and layer.qweight.numel() == 0
    codes = (layer.mma_words.numel() + layer.mma_hwords.numel()) * 4
    spare = PREFETCH * 32 * (4 + (2 if bits == 3 else 0)) * 4  # the kernel's spare loads
    assert codes == qw.numel() * 4 + spare  # one packed copy of the codes (N = 128: no padded columns)
    for M in (3, 17, 40):  # CPU x under the interpreter: the Triton kernels on the layout at every M
        x = randn(M, 256, dtype=torch.float16, seed=M)
        assert rel(layer(x), x.double() @ W.T) <= 2e-3
    with checkpoint_qweights_on("cpu"):
        sd = layer.state_dict()
    assert torch.equal(sd["qweight"], qw) and torch.equal(sd["qzeros"], qz) and torch.equal(sd["scales"], sc)
    # a fresh layer loads that state dict with the GEMV on; opting out restores the checkpoint layout exactly
    other = mk.QuantLinear(256, 128, bits, group_size).enable_cuda_gemv(False)
    other.load_state_dict(sd)
    assert torch.equal(other.state_dict()["qweight"], qw)
    layer.enable_cuda_gemv(False)
    assert not layer.cuda_gemv and layer.qweight.shape == qw.shape
    assert torch.equal(layer.state_dict()["qweight"], qw)


def test_every_layout_the_cuda_gemv_takes_has_a_config_in_every_list():
    """Each schedule, split-K or deterministic, finds a tile for every (bits, group) of the mma layout in the
    full, quick and interpreter lists (also the GPU test's cases, whose inputs the emulator twin in
    test_mma_layout.py builds): on a GPU a missing one would be a launch error."""
    from maca_kernels.ops.quant_matmul import triton_kernel as tk

    assert {(b, g) for b, g, _, _ in MMA_TRITON_RUNS} <= set(CUDA_GEMV_CASES)
    for bits, groups in KERNEL_GROUPS.items():
        for K in (CUDA_GEMV_K, 4096, 4160 if bits == 4 else 4224):
            for group in (K, *groups):
                if K % group or not supports(bits, group, K, 64):
                    continue
                for lists in (tk.MMA_CONFIGS, tk.MMA_QUICK_CONFIGS, tk.MMA_INTERPRETER_CONFIGS):
                    for schedule, configs in lists.items():
                        for atomic in (True, False) if schedule != "large" else (False,):
                            assert any(tk.fits(c, group, False, atomic, mma_bits=bits) for c in configs), (
                                bits, group, K, schedule, atomic)


def test_quant_linear_with_the_cuda_gemv_compiles():
    """torch.compile(fullgraph=True) through the mma layout's Triton op (CPU x under the interpreter)."""
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, 3, 128, True, seed=20)
    layer = mk.QuantLinear.from_checkpoint({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}, 3, 128)
    layer.enable_cuda_gemv()
    x = randn(20, 256, dtype=torch.float16, seed=21)
    out = torch.compile(layer, fullgraph=True)(x)
    assert torch.equal(out, layer(x)) and rel(out, x.double() @ W.T) <= 2e-3


@pytest.mark.parametrize("bits,N,group_size", [(4, 37, 64), (3, 45, 128), (2, 23, -1)])
def test_odd_column_counts(bits, N, group_size):
    """N odd (the layout pads columns to 64; only checkpoints need N·bits/32 whole): packed directly."""
    from maca_kernels.ops.quant_matmul.mma_layout import pack_mma
    from maca_kernels.ops.quant_matmul.triton_kernel import launch_mma_matmul

    K = 384
    G = 1 if group_size == -1 else K // group_size
    g = torch.Generator().manual_seed(N)
    codes, zeros = torch.randint(0, 2**bits, (N, K), generator=g), torch.randint(0, 2**bits, (N, G), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.02 + 0.001).half()
    gi = torch.arange(K) // (K // G)
    W = (codes - zeros[:, gi]).double() * scales.double()[:, gi]
    w = pack_mma(codes, zeros, scales, bits, group_size)
    for M in (1, 9, 70):
        x = randn(M, K, dtype=torch.float16, seed=M)
        assert rel(launch_mma_matmul(x, w), x.double() @ W.T) <= 2e-3


def test_checkpoint_repacked_a_column_block_at_a_time(monkeypatch):
    """state_dict() and enable_cuda_gemv(False) repack from the layout in blocks of columns (bounded int64
    temporaries); a load that brings its own qweight skips the repack altogether."""
    import maca_kernels.nn.quant_linear as ql
    from maca_kernels.ops.quant_matmul import decode_layout

    monkeypatch.setattr(decode_layout, "_REPACK_COLS", 64)  # N = 144: blocks of 64, 64 and 16 columns (padded to 192)
    for bits, act_order in ((4, True), (3, False)):
        W, qw, sc, qz, g_idx = random_checkpoint(160 if bits == 3 else 144, 256, bits, 128, act_order, seed=bits)
        tensors = {"qweight": qw, "scales": sc, "qzeros": qz} | ({"g_idx": g_idx} if act_order else {})
        layer = mk.QuantLinear.from_checkpoint(tensors, bits, 128).enable_cuda_gemv()
        assert torch.equal(layer.state_dict()["qweight"], qw)
        W2, qw2, sc2, qz2, g2 = random_checkpoint(qw.shape[1], 256, bits, 128, act_order, seed=bits + 9)
        incoming = layer.state_dict() | {"qweight": qw2, "scales": sc2, "qzeros": qz2} | (
            {"g_idx": g2} if act_order else {})
        monkeypatch.setattr(ql, "mma_qweight", None)  # must not be needed
        layer.load_state_dict(incoming)
        monkeypatch.undo()
        monkeypatch.setattr(decode_layout, "_REPACK_COLS", 64)
        assert layer.cuda_gemv and torch.equal(layer.state_dict()["qweight"], qw2)
        x = randn(20, 256, dtype=torch.float16, seed=bits)
        assert rel(layer(x), x.double() @ W2.T) <= 2e-3
        layer.enable_cuda_gemv(False)  # group order back in qweight (input order for a sorted layer)
        assert (layer.perm is not None) == act_order and torch.equal(layer.state_dict()["qweight"], qw2)
        assert act_order or torch.equal(layer.qweight, qw2)
