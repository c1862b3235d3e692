"""Launcher for the C++ weighted Gram kernel (``csrc/hessian``), zero-copy on CPU tensors."""

from __future__ import annotations

import torch

from ..._native import require_native

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cpu_weighted_gram(
    out: torch.Tensor,
    a: torch.Tensor,
    runs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    a_sub: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    num_threads: int = 0,
) -> None:
    """``out += Σ_t w(t) A_tᵀ B_t`` with A = a (or a − a_sub) and B = b (or A, computed symmetrically)."""
    C = require_native("accumulate_hessian")
    start, length, weight = (t.contiguous() for t in runs)
    for t in (a_sub, b):
        assert t is None or t.stride() == a.stride(), "launcher must hand over one row layout"
    C.weighted_gram(
        out.data_ptr(),
        out.stride(0),
        a.shape[1],
        a.data_ptr(),
        0 if a_sub is None else a_sub.data_ptr(),
        0 if b is None else b.data_ptr(),
        _DTYPE_CODE[a.dtype],
        a.stride(0),
        start.data_ptr(),
        length.data_ptr(),
        weight.data_ptr(),
        start.numel(),
        num_threads,
    )
