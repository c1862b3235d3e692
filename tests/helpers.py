"""Shared test utilities: float64 ground truth, error measures, random inputs."""

from __future__ import annotations

import pytest
import torch

from maca_kernels._triton_utils import INTERPRETING

needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton-on-CPU tests need TRITON_INTERPRET=1 (set automatically without a GPU)"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error of ``got`` against a float64 ``want``."""
    want = want.to(torch.float64).cpu()
    return ((got.to(torch.float64).cpu() - want).norm() / want.norm()).item()


def gram64(x: torch.Tensor, lengths, weighting: str = "sequence", x_fp: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth ``Σ_s w_s A_sᵀ X_s`` in float64 from the (already rounded) input values."""
    x = x.to(torch.float64).cpu()
    xf = None if x_fp is None else x_fp.to(torch.float64).cpu()
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    start = 0
    for n in [int(v) for v in lengths]:
        xs = x[start : start + n]
        a = xs if xf is None else xf[start : start + n] - xs
        out += (1.0 / n if weighting == "sequence" else 1.0) * (a.T @ xs)
        start += n
    return out


def randn(*shape, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def ragged_lengths(seed: int, count: int = 7, max_len: int = 97) -> torch.Tensor:
    """Ragged lengths that include 1-token sequences and no block-size multiples by construction."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(2, max_len, (count,), generator=g)
    n[0] = 1
    n[count // 2] = 1
    return n
