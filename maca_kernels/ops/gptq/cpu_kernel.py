"""C++ column sweep for CPU tensors: ``csrc/gptq/block_sweep.cpp`` per block, lazy updates with ``addmm_``.

The launcher mirrors ``triton_kernel.gptq_sweep_triton``: one native call per column block (OpenMP over
row tiles; it writes the codes, new groups' scales/zeros, and the block's ``Err`` and ``W_blk``), then one
GEMM per term updates the later columns. ``W[:, i2:].addmm_(Err, U_blk, alpha=-1)`` rounds exactly like
the reference's ``W[:, i2:] -= Err @ U_blk``, and the kernel repeats the reference's fp32 operations one
by one, so the codes agree with the reference bit for bit (MSE search: up to near-ties, see the C++ file).
"""

from __future__ import annotations

import torch

from ..._native import require_native
from .prepare import Prepared
from .quantizer import mse_shrink_factors

NORM = 2.4  # the MSE search's error exponent (quantizer.find_params' default)


def native_sweep():
    """The extension's block kernel, or a clear error when the extension is missing or stale."""
    C = require_native("gptq_quantize")
    if not hasattr(C, "gptq_block_sweep"):
        raise RuntimeError(
            "gptq_quantize: the C++ extension maca_kernels._C predates the CPU GPTQ kernel (no gptq_block_sweep). "
            "Rebuild it with `make build` (or `pip install --no-build-isolation -e .`), or pass backend='reference'."
        )
    return C


def gptq_sweep_cpp(prep: Prepared, bits: int, group_size: int, sym: bool, mse: bool, num_threads: int = 0):
    """Same contract as ``reference.gptq_sweep_reference`` (codes as int32). ``num_threads`` ≤ 0: torch's."""
    C = native_sweep()
    W = prep.W.contiguous()
    N, K = W.shape
    precomputed = prep.static_scale is not None
    if precomputed:
        scales = prep.static_scale.to(torch.float32).contiguous()
        zeros = prep.static_zero.to(torch.float32).contiguous()
        dyn_group = 0
    else:
        if group_size <= 0 or K % group_size or prep.block_size % group_size:
            raise ValueError("dynamic groups must divide K and the block size")
        scales = torch.empty(N, K // group_size, dtype=torch.float32)
        zeros = torch.empty_like(scales)
        dyn_group = group_size
    codes = torch.empty(N, K, dtype=torch.int32)
    bs = prep.block_size
    err = torch.empty(N, bs, dtype=torch.float32)
    gptaq = prep.P is not None
    wq = torch.empty_like(err) if gptaq else None
    gpos = prep.group_of_pos.to(torch.int64).contiguous()
    shrink = mse_shrink_factors() if mse else None
    U = prep.U.to(torch.float32).contiguous()
    P = prep.P.to(torch.float32).contiguous() if gptaq else None
    threads = num_threads if num_threads > 0 else torch.get_num_threads()
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        C.gptq_block_sweep(
            W.data_ptr(), W.stride(0), N, i1, i2 - i1, U.data_ptr(), P.data_ptr() if gptaq else 0, U.stride(0),
            codes.data_ptr(), codes.stride(0), scales.data_ptr(), zeros.data_ptr(), scales.stride(0), dyn_group,
            gpos.data_ptr(), err.data_ptr(), wq.data_ptr() if gptaq else 0, err.stride(0), 2**bits - 1, sym,
            shrink.data_ptr() if mse else 0, shrink.numel() if mse else 0, NORM, threads,
        )
        if i2 < K:
            W[:, i2:].addmm_(err[:, : i2 - i1], U[i1:i2, i2:], alpha=-1.0)
            if gptaq:
                W[:, i2:].addmm_(wq[:, : i2 - i1], P[i1:i2, i2:])
    return codes, (None if precomputed else scales), (None if precomputed else zeros)
