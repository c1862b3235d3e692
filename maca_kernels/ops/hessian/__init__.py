"""Length-aware (MaCa) Hessian accumulation: ``H += Σ_s w_s X_sᵀ X_s``.

``accumulate_hessian`` validates, builds a run plan (``plan.py``) and dispatches: CUDA tensors to the
Triton kernel, CPU tensors to the C++ kernel; ``backend="reference"`` runs the plain-PyTorch loop.
"""

from __future__ import annotations

import contextlib

import torch

from .plan import GramPlan, make_plan
from .reference import weighted_gram_reference

BACKENDS = (None, "triton", "cpp", "reference")


def _check_out(out: torch.Tensor, d: int, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32 or tuple(out.shape) != (d, d):
        raise ValueError(f"out must be a float32 [d, d] = [{d}, {d}] tensor, got {out.dtype} {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but x is on {device}")
    if out.stride(1) != 1 or out.stride(0) < d:
        raise ValueError(f"out must have unit stride along its last dimension and rows ≥ {d} apart, "
                         f"got strides {tuple(out.stride())}")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend is None:
        return "triton" if device.type == "cuda" else "cpp"
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got a tensor on {device}")
    return backend


def gram_from_plan(
    plan: GramPlan,
    out: torch.Tensor,
    *,
    cross: bool = False,
    weighting: str,
    backend: str | None = None,
    deterministic: bool = False,
    upper_only: bool = False,
) -> torch.Tensor:
    """Run one validated plan: ``out += Σ w XᵀX`` (or ``Σ w ΔXᵀX`` when ``cross``). ``upper_only``: only
    the upper triangle of ``out`` needs to come out right (the Triton kernel then skips its mirror pass)."""
    a, a_sub, b = (plan.x_fp, plan.x, plan.x) if cross else (plan.x, None, None)
    runs = (plan.run_start, plan.run_len, plan.run_weight)
    backend = resolve_backend(backend, plan.x.device)
    if backend == "triton":
        from ..._triton_utils import check_triton_device, num_sms
        from .triton_kernel import launch_weighted_gram

        check_triton_device(plan.x, "accumulate_hessian")
        on_gpu = plan.x.device.type == "cuda"
        with torch.cuda.device(plan.x.device) if on_gpu else contextlib.nullcontext():
            launch_weighted_gram(
                out, a, runs, a_sub=a_sub, b=b, weighted=weighting == "sequence",
                n_sms=num_sms(plan.x.device), split=1 if deterministic else None, upper_only=upper_only,
            )
    elif backend == "cpp":
        from .cpu_kernel import cpu_weighted_gram

        cpu_weighted_gram(out, a, runs, a_sub=a_sub, b=b)
    else:
        out += _reference_from_plan(plan, cross)
    return out


def _reference_from_plan(plan: GramPlan, cross: bool) -> torch.Tensor:
    d = plan.d
    total = torch.zeros(d, d, dtype=torch.float32, device=plan.x.device)
    for s, n, w in zip(plan.run_start.tolist(), plan.run_len.tolist(), plan.run_weight.tolist(), strict=True):
        xs = plan.x[s : s + n].float()
        a = plan.x_fp[s : s + n].float() - xs if cross else xs
        total += w * (a.T @ xs)
    return total


def accumulate_hessian(
    x: torch.Tensor,
    lengths=None,
    *,
    weighting: str = "sequence",
    out: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    check_finite: bool = True,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Length-aware Hessian statistic of calibration activations, fp32 ``[d, d]``.

    ``weighting="sequence"`` (MaCa): ``Σ_s (1/n_s) X_sᵀ X_s`` — each sequence one sample.
    ``weighting="token"``: ``Σ_t x_t x_tᵀ`` (classic GPTQ sum).

    x: packed ``[T, d]`` with ``lengths [S]`` (sum T), or padded ``[B, L, d]`` with ``attention_mask [B, L]``
    or ``lengths [B]`` (valid prefix lengths); fp16, bf16 or fp32. ``out``: fp32 ``[d, d]`` to accumulate
    into in place (``out += ...``). ``deterministic`` forbids the split-T (atomic) GPU schedule.
    """
    plan = make_plan(x, lengths, attention_mask=attention_mask, weighting=weighting, check_finite=check_finite)
    if out is None:
        out = torch.zeros(plan.d, plan.d, dtype=torch.float32, device=x.device)
    else:
        _check_out(out, plan.d, x.device)
    return gram_from_plan(plan, out, weighting=weighting, backend=backend, deterministic=deterministic)


__all__ = ["accumulate_hessian", "gram_from_plan", "make_plan", "weighted_gram_reference"]
