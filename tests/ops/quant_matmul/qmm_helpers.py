"""Random GPTQ checkpoints for the quant_matmul tests (codes, zeros, scales and their packing)."""

from __future__ import annotations

import torch

from maca_kernels.formats.gptq import pack_gptq, pack_gptq_zeros


def random_checkpoint(N: int, K: int, bits: int, group_size: int, act_order: bool, seed: int = 0,
                      convention: str = "gptq"):
    """Returns (W float64 [N, K], qweight, scales fp16 [G, N], qzeros, g_idx int32 [K] or None)."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, maxq + 1, (N, K), generator=g)
    zeros = torch.randint(1, maxq + 1, (N, G), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.02 + 0.001).half()
    gi = torch.arange(K) // (K // G)
    if act_order:
        gi = gi[torch.randperm(K, generator=g)]
    W = (codes - zeros[:, gi]).double() * scales.double()[:, gi]
    return (W, pack_gptq(codes, bits), scales.T.contiguous(), pack_gptq_zeros(zeros, bits, convention),
            gi.to(torch.int32) if act_order else None)


# The CUDA GEMV's GPU test (test_quant_matmul_gpu.py) and its CPU twin on the emulator (test_mma_layout.py):
# N not a multiple of the 64 columns of a CTA (a multiple of 32, as 3-bit zeros need), K = 17 x 128 (not whole
# trips of the kernel's load ring), every (bits, group) the kernel has.
CUDA_GEMV_K, CUDA_GEMV_N = 2176, 1120
CUDA_GEMV_CASES = [(4, 128), (4, 64), (4, 32), (4, -1), (3, 128), (3, -1), (2, 128), (2, -1)]


def cuda_gemv_checkpoint(bits: int, group_size: int, act_order: bool):
    """The GPU test's checkpoint for one case (act-order only where there are groups)."""
    return random_checkpoint(CUDA_GEMV_N, CUDA_GEMV_K, bits, group_size, act_order and group_size != -1,
                             seed=bits + CUDA_GEMV_K + act_order)


# The GPU test of the Triton kernels on the mma layout (bits, group, x dtype, rows), same shapes: every schedule
# once (the GEMV only serves 1-16 rows where the CUDA GEMV cannot compile) and each bit width. Each (bits, group,
# dtype, schedule) is a fresh autotuned compile (~15 with MACA_KERNELS_TUNE=quick), and make gpu-check gives the
# whole GPU tier a time budget.
MMA_TRITON_RUNS = [(4, 128, torch.float16, 1), (4, 128, torch.float16, 17), (4, 128, torch.bfloat16, 300),
                   (4, 32, torch.float16, 17), (3, 128, torch.float16, 40), (2, -1, torch.bfloat16, 17)]
