"""The CUDA GEMV's own source run on the CPU (host_gemv.py: g++ with cuda_host.h, every thread of a CTA a host
thread, mma.sync a barrier of the warp): every kernel of gemv_mma.cu, launched by the launcher's plan, against
float64 on fresh random inputs; outputs start as NaN. The arithmetic the GPU adds (the fp32 accumulation of the
mma's and of the groups, the final rounding to x's type) is all that may differ."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import randn
from qmm_helpers import CUDA_GEMV_K, CUDA_GEMV_N, cuda_gemv_checkpoint, random_checkpoint

import maca_kernels as mk
from maca_kernels.ops.quant_matmul import cuda_kernel
from maca_kernels.ops.quant_matmul.mma_layout import KERNEL_GROUPS

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")


def host():
    import host_gemv

    return host_gemv


def check(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> None:
    """y within half an ulp of x's type of the float64 product, plus the fp32 accumulation's error."""
    want = x.double() @ W.T
    assert not torch.isnan(y).any(), "an output the kernel never wrote"
    ulp = torch.finfo(x.dtype).eps * want.abs()
    bound = 0.5 * ulp + 2e-6 * (x.double().abs() @ W.abs().T)
    err = (y.double() - want).abs()
    assert (err <= bound).all(), f"max error {float(err.max()):.3g}, {int((err > bound).sum())} outside the bound"


VARIANTS = [(bits, group, dtype) for bits in (4, 3, 2) for group in (*KERNEL_GROUPS[bits], -1)
            for dtype in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("bits,group_size,dtype", VARIANTS,
                         ids=[f"b{b}-g{g}-{str(d)[6:]}" for b, g, d in VARIANTS])
def test_every_kernel_matches_float64(bits, group_size, dtype):
    """N = 160 (padded to 192 columns), K = 1152 (not whole trips of the load ring), act order where there are
    groups; M on both kernels (1-8, 9-16); one warp per CTA (deterministic) and several (4 SMs: 8 slices)."""
    N, K = 160, 1152
    for act_order in (False, True) if group_size != -1 else (False,):
        W, qw, sc, qz, gi = random_checkpoint(N, K, bits, group_size, act_order, seed=bits + K + act_order)
        d = mk.to_decode_weight(qw, sc, qz, gi, bits, group_size, "gptq", mma=True)
        for M in (1, 6, 9, 16):
            x = randn(M, K, dtype=dtype, seed=M + bits)
            for n_sms, deterministic in ((1, True), (4, False)):
                check(host().run(x, d.mma, n_sms=n_sms, deterministic=deterministic), x, W)


def test_slices_add_up_in_a_fixed_order():
    """The GPU test's shape (K = 17 x 128) on every number of warps per CTA the launcher can choose (its ranges
    of K: whole groups, the last shorter, some empty): the same product within rounding, and the same bits for
    the same plan (the warps' sums are added in slice order)."""
    W, qw, sc, qz, gi = cuda_gemv_checkpoint(4, 128, False)
    d = mk.to_decode_weight(qw, sc, qz, gi, 4, 128, "gptq", mma=True)
    x = randn(2, CUDA_GEMV_K, dtype=torch.float16, seed=3)
    seen = {}
    for n_sms in (1, 16, 40, 132, 264):
        plan = cuda_kernel.launch_plan(x, d.mma, n_sms)
        y = host().run(x, d.mma, n_sms=n_sms)
        check(y, x, W)
        assert y.shape == (2, CUDA_GEMV_N)
        slices = plan.block[0] // 32
        if slices in seen:
            assert torch.equal(seen[slices], y)
        seen[slices] = y
    assert len(seen) >= 3, sorted(seen)


EDGES = [  # (bits, N, K, group_size): one 128-bit load of K, one 16-column tile, columns padded to 64
    (4, 16, 64, 32), (4, 48, 64, -1), (4, 32, 192, 64), (3, 32, 128, 128), (3, 64, 128, -1), (2, 16, 128, -1),
    (2, 48, 384, 128),
]


@pytest.mark.parametrize("bits,N,K,group_size", EDGES, ids=[f"b{b}-N{n}-K{k}-g{g}" for b, n, k, g in EDGES])
def test_edge_shapes_and_strided_x(bits, N, K, group_size):
    """The smallest shapes (a warp's whole range one load, or a partial trip; one tile), rows 1..16, and x as a
    view: rows further apart than K (read in place) or not 16-byte aligned (copied by the launcher)."""
    W, qw, sc, qz, gi = random_checkpoint(N, K, bits, group_size, False, seed=bits * N + K)
    d = mk.to_decode_weight(qw, sc, qz, gi, bits, group_size, "gptq", mma=True)
    for M in (1, 2, 7, 8, 10, 15, 16):
        wide = randn(M, K + 24, dtype=torch.float16, seed=M + K)
        for x in (wide[:, :K], wide[:, 3:K + 3]):  # row stride K + 24 (a multiple of 8); an odd offset
            for n_sms in (1, 132):
                check(host().run(x, d.mma, n_sms=n_sms), x, W)
    plan = cuda_kernel.launch_plan(wide[:, 3:K + 3], d.mma, 132)
    assert plan.args[0].data_ptr() % 16 == 0 and plan.args[1] % 8 == 0  # the copy the kernel reads
    assert cuda_kernel.launch_plan(wide[:, :K], d.mma, 132).args[0].data_ptr() == wide.data_ptr()  # no copy
