"""Per-row min/max group quantizer (GPTQ's), shared by the reference and mirrored by the kernels.

Conventions every implementation follows exactly:
- the range always contains 0 (``xmin ≤ 0 ≤ xmax``); an all-zero row gets ``[-1, 1]``;
- scales are rounded to fp16-representable values (the checkpoint stores fp16 scales, so the
  exported model dequantizes to exactly the weights the solver chose), at least 2⁻²⁴; one past fp16's
  max becomes 2¹⁶ (never a valid fp16 scale), and ``check_scales`` refuses the result (the kernels never
  divide by 0 or inf);
- asymmetric zeros are ``round(−xmin/scale)`` but never 0: a v1 ("gptq") checkpoint cannot hold a
  zero of 0, so such a row takes ``scale = xmax/(maxq − 1)``, ``zero = 1``;
- symmetric zeros are ``(maxq + 1)/2``;
- rounding is round-half-to-even (``torch.round``; the kernels use the 1.5·2²³ trick, identical).
"""

from __future__ import annotations

import torch

FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0
SCALE_OVERFLOW = 2.0**16  # what a scale that rounds past fp16's max becomes (never a valid fp16 scale)


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=FP16_MIN_SUBNORMAL).to(torch.float16).to(torch.float32).clamp(max=SCALE_OVERFLOW)


def check_scales(scales: torch.Tensor, name: str | None = None) -> None:
    """Refuse what the GPTQ checkpoint's fp16 scales cannot hold, naming the layer: a scale past fp16's max (an
    overflow), or a layer without one normal scale (below 2⁻¹⁴ everywhere: e.g. W × 1e-9 would round to zeros).
    A group of a normal layer whose scale is subnormal or clamped to 2⁻²⁴ (a nearly dead channel) is kept: its
    error is at most 2⁻²⁵ absolute, below the rounding of the layer's own scales. Checked on every backend."""
    over = scales > FP16_MAX
    if bool(over.any()):
        r, g = (int(i) for i in over.nonzero()[0])
        problem = f"row {r}, group {g} needs a scale above fp16's max {FP16_MAX:.0f}"
    elif scales.numel() and float(scales.max()) < FP16_MIN_NORMAL:
        problem = (f"its largest scale {float(scales.max()):.3g} is below fp16's smallest normal "
                   f"{FP16_MIN_NORMAL:.3g} (weights too small)")
    else:
        return
    where = f"layer {name}: " if name else ""
    raise ValueError(f"{where}{problem}, which the GPTQ checkpoint's fp16 scales cannot hold: rescale the weight "
                     "(e.g. move a power of two into a neighbouring layer) or keep this layer in float "
                     "(quantize_model's keep_float)")


def scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for a range that already contains 0 (and is not empty)."""
    if sym:
        scale = round_scale((xmax - xmin) / maxq)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    scale = round_scale((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    at_zero = zero < 1
    if at_zero.any():
        scale = torch.where(at_zero, round_scale(xmax / (maxq - 1)), scale)
        zero = torch.where(at_zero, torch.ones_like(zero), zero)
    return scale, zero.clamp(max=maxq)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of ``x`` [N, g] with per-row ``scale``/``zero`` [N]."""
    return torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero[:, None]) * scale[:, None]


def mse_shrink_factors(grid: int = 100, maxshrink: float = 0.8, device=None) -> torch.Tensor:
    """fp32 range multipliers ``1 − i/grid`` tried by the MSE search (one table for every backend)."""
    n = int(maxshrink * grid)
    return torch.tensor([1 - i / grid for i in range(n)], dtype=torch.float32, device=device)


def find_params(
    x: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for the columns ``x`` [N, g] of one group.

    With ``mse`` the range is shrunk by ``1 − i/grid`` (i < maxshrink·grid) and the candidate with the
    least ``Σ|q(x) − x|^norm`` per row is kept (GPTQ's grid search)."""
    maxq = 2**bits - 1
    x = x.float()
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = scale_zero(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    best = torch.full_like(xmin, float("inf"))
    for p in mse_shrink_factors(grid, maxshrink, x.device):
        s1, z1 = scale_zero(p * xmin, p * xmax, maxq, sym)
        err = (dequantize(quantize(x, s1, z1, maxq), s1, z1) - x).abs().pow(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero
