"""Plain-PyTorch reference for the length-aware Hessian.

The obvious loop over sequences: upcast, compute ``X_sᵀ X_s`` in fp32, scale the fp32 product by the
sequence weight and add. Kernels are tested against this and against float64 (``dtype=torch.float64``).
"""

from __future__ import annotations

import torch


def sequence_weights(lengths: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sequence weight: ``1/n_s`` for MaCa ("sequence"), 1 for the classic GPTQ sum ("token")."""
    if weighting == "sequence":
        return 1.0 / lengths.to(torch.float64)
    return torch.ones(lengths.numel(), dtype=torch.float64)


def weighted_gram_reference(
    x: torch.Tensor,
    lengths: torch.Tensor,
    weighting: str = "sequence",
    x_fp: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``Σ_s w_s A_sᵀ X_s`` over the packed sequences of ``x`` [T, d].

    ``A = X`` gives the Hessian statistic; ``A = x_fp − x`` (when ``x_fp`` is given) gives the GPTAQ
    cross term ``Σ_s w_s ΔX_sᵀ X_s``. Computed in ``dtype`` (fp32 for the reference, fp64 for ground truth).
    """
    d = x.shape[-1]
    out = torch.zeros(d, d, dtype=dtype, device=x.device)
    weights = sequence_weights(lengths.cpu(), weighting)
    start = 0
    for n, w in zip(lengths.tolist(), weights.tolist(), strict=True):
        xs = x[start : start + n].to(dtype)
        a = xs if x_fp is None else x_fp[start : start + n].to(dtype) - xs
        out += w * (a.T @ xs)
        start += n
    return out


def padded_to_packed(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the valid tokens of a padded batch [B, L, d] into packed [T, d] plus per-row lengths."""
    mask = attention_mask.bool()
    return x[mask], mask.sum(dim=1)
