"""GPTQ / GPTAQ quantization of one layer: ``gptq_quantize(W, H, ...)``; ``gptq_factor(H, ...)`` once for several
weights solved against one Hessian.

``prepare.py`` validates and does the dense linear algebra (dead columns, regularisation, act-order,
damping escalation, Cholesky of H⁻¹, GPTAQ's P); the column sweep runs in the Triton kernel on CUDA
tensors, in the C++ kernel of the extension (``backend="cpp"``) on CPU tensors, and in the plain-PyTorch
reference with ``backend="reference"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .prepare import (
    HessianFactor,
    NotPositiveDefiniteError,
    check_inputs,
    factor,
    factor_settings,
    ieee_fp32_matmul,
    prepare,
)
from .quantizer import check_scales
from .reference import gptq_sweep_reference
from .result import GPTQResult

BACKENDS = (None, "triton", "cpp", "reference")


def _assemble(W, H, prep, codes_pos, dyn_scales, dyn_zeros, bits, group_size, sym, compute_loss,
              name) -> GPTQResult:
    N, K = W.shape
    perm = prep.perm
    check_scales(prep.static_scale if prep.static_scale is not None else dyn_scales, name)
    codes = torch.empty(N, K, dtype=torch.int32, device=W.device)
    codes[:, perm] = codes_pos.to(torch.int32)
    g = group_size if group_size > 0 else K
    if prep.static_scale is not None:  # groups of original columns
        scales, zeros = prep.static_scale, prep.static_zero
        g_idx = torch.arange(K, device=W.device) // g
    else:  # dynamic groups follow the processing order
        scales, zeros = dyn_scales, dyn_zeros
        g_idx = torch.empty(K, dtype=torch.int64, device=W.device)
        g_idx[perm] = torch.arange(K, device=W.device) // g
    zeros = zeros.to(torch.int32)
    weight = (codes - zeros[:, g_idx]).to(torch.float32) * scales[:, g_idx]
    loss = float("nan")
    if compute_loss:  # one more N·K² GEMM
        dW = W.to(torch.float32) - weight
        loss = float(((dW @ H.to(torch.float32)) * dW).sum())
    return GPTQResult(codes, scales, zeros, g_idx.to(torch.int32), weight, loss, prep.damp, bits, group_size,
                      sym, perm)


def gptq_factor(
    H: torch.Tensor,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    dxxt: torch.Tensor | None = None,
    alpha: float = 0.25,
    reg: float | None = None,
    saliency: torch.Tensor | None = None,
    name: str | None = None,
    damp_steps=None,
) -> HessianFactor:
    """The part of a GPTQ solve that depends on ``H`` alone (damping, act-order, the Cholesky factor of H⁻¹, GPTAQ's
    P), to pass as ``gptq_quantize(W, H, ..., factor=f)`` for every weight that shares ``H`` (q/k/v, gate/up, an
    expert's gate/up): one factorisation instead of one per weight, the same bits. The arguments are
    ``gptq_quantize``'s; each solve must ask for the same ones."""
    damp_steps = None if damp_steps is None else tuple(damp_steps)
    if not isinstance(H, torch.Tensor) or H.dim() != 2:
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H must be a floating-point [K, K] tensor, got {got}{f' (layer {name})' if name else ''}")
    probe = torch.zeros(1, H.shape[1], device=H.device)  # the checks of gptq_quantize, for H's side
    check_inputs(probe, H, 4, -1, 128, damp, dxxt, alpha, reg, saliency, name, damp_steps=damp_steps)
    with ieee_fp32_matmul():
        return factor(H, act_order=act_order, damp=damp, dxxt=dxxt, alpha=alpha, reg=reg, saliency=saliency,
                      name=name, damp_steps=damp_steps)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    *,
    mse: bool = False,
    dxxt: torch.Tensor | None = None,
    alpha: float = 0.25,
    reg: float | None = None,
    saliency: torch.Tensor | None = None,
    backend: str | None = None,
    name: str | None = None,
    compute_loss: bool = True,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    damp_steps=None,
    factor: HessianFactor | None = None,
) -> GPTQResult:
    """Quantize ``W`` [N, K] (out × in) against the layer Hessian ``H`` [K, K] with GPTQ.

    bits 2/3/4/8; ``group_size`` −1 for one group per row; ``sym`` symmetric zero points;
    ``act_order`` processes columns by decreasing ``diag(H)``; ``static_groups`` fixes group
    parameters on the original weights before the sweep; ``damp`` is a fraction of mean(diag H),
    raised step by step if H is not positive definite (the value used is ``result.damp``);
    ``mse`` grid-searches shrunk ranges. GPTAQ: pass ``dxxt`` = ΔXᵀX (and ``alpha``).
    Saliency regularisation: ``reg`` = λ adds ``λ·mean(diag H)·diag(s)`` to H, ``s`` =
    ``saliency`` or the normalised diag(H). ``name`` labels errors (e.g. the layer's name).
    ``compute_loss=False`` skips ``loss = tr(ΔW H ΔWᵀ)`` (one more N·K² GEMM; the result says NaN).
    ``scales``/``zeros`` [N, G] fix the group parameters (groups of original columns, as with static
    groups; true integer zeros in [0, 2^bits − 1]) and GPTQ only chooses the codes: e.g. parameters from
    another tool's observer. ``damp_steps``: the increasing fractions tried after ``damp`` when H is not
    positive definite (default: this library's schedule; ``()`` fails at once with
    ``NotPositiveDefiniteError``). ``factor``: ``gptq_factor(H, ...)`` made with this call's act_order, damp,
    dxxt, alpha, reg, saliency and damp_steps, shared by the weights solved against ``H``.
    """
    damp_steps = None if damp_steps is None else tuple(damp_steps)  # a generator would be used up by the check
    if not isinstance(sym, bool):
        raise ValueError(f"sym must be a bool, got {sym!r}{f' (layer {name})' if name else ''}")
    check_inputs(W, H, bits, group_size, block_size, damp, dxxt, alpha, reg, saliency, name,
                 scales=scales, zeros=zeros, mse=mse, damp_steps=damp_steps)
    bits = int(bits)  # checked: an int or an integer-like (e.g. numpy's), as the extension wants it
    if factor is not None:
        _check_factor(factor, W, factor_settings(act_order, damp, dxxt, alpha, reg, saliency, damp_steps), name)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend is None:
        backend = "triton" if W.device.type == "cuda" else "cpp"
    if backend == "cpp":
        if W.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got W on {W.device}")
        from .cpu_kernel import native_sweep

        native_sweep()  # a missing or stale extension fails before the (long) preparation
    with ieee_fp32_matmul():
        prep = prepare(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                       static_groups=static_groups, damp=damp, block_size=block_size, mse=mse, dxxt=dxxt,
                       alpha=alpha, reg=reg, saliency=saliency, name=name, scales=scales, zeros=zeros,
                       damp_steps=damp_steps, shared=factor)
        if backend == "triton":
            from ..._triton_utils import check_triton_device
            from .triton_kernel import gptq_sweep_triton

            check_triton_device(W, "gptq_quantize")
            with torch.cuda.device(W.device) if W.device.type == "cuda" else contextlib.nullcontext():
                codes, scales, zeros = gptq_sweep_triton(prep, bits, group_size, sym, mse)
        elif backend == "cpp":
            from .cpu_kernel import gptq_sweep_cpp

            codes, scales, zeros = gptq_sweep_cpp(prep, bits, group_size, sym, mse)
        else:
            codes, scales, zeros = gptq_sweep_reference(prep, bits, group_size, sym, mse)
        return _assemble(W, H, prep, codes, scales, zeros, bits, group_size, sym, compute_loss, name)


def gptq_quantize_batched(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    *,
    mse: bool = False,
    dxxts: Sequence[torch.Tensor] | None = None,
    alpha: float = 0.25,
    reg: float | None = None,
    backend: str | None = None,
    names: Sequence[str] | None = None,
    compute_loss: bool = True,
    factors: Sequence[HessianFactor] | None = None,
) -> list[GPTQResult]:
    """``gptq_quantize`` of several weights of one shape, each against its own Hessian (a layer's experts), with the
    same settings: on CUDA tensors one sweep launch per column block serves them all (the Triton kernel's second
    grid axis), elsewhere they are solved one after another. Each result has the bits ``gptq_quantize`` gives that
    weight alone. ``dxxts``, ``names``, ``factors``: one per weight, or None."""
    Ws, Hs = list(Ws), list(Hs)
    n = len(Ws)
    for label, seq in (("Hs", Hs), ("dxxts", dxxts), ("names", names), ("factors", factors)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{label} must hold one entry per weight ({n}), got {len(seq)}")
    if n == 0:
        return []
    shapes = {tuple(W.shape) for W in Ws if isinstance(W, torch.Tensor)}
    if len(shapes) != 1 or len({W.device for W in Ws}) != 1:
        raise ValueError(f"Ws must be tensors of one shape on one device, got shapes {sorted(shapes)}")
    per = [dict(dxxt=None if dxxts is None else dxxts[i], name=None if names is None else names[i],
                factor=None if factors is None else factors[i]) for i in range(n)]
    kw = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups, damp=damp,
              block_size=block_size, mse=mse, alpha=alpha, reg=reg, compute_loss=compute_loss)
    if backend is None:
        backend = "triton" if Ws[0].device.type == "cuda" else "cpp"
    if backend != "triton":
        return [gptq_quantize(W, H, backend=backend, **kw, **p) for W, H, p in zip(Ws, Hs, per, strict=True)]
    from ..._triton_utils import check_triton_device
    from .triton_kernel import gptq_sweep_triton_batched

    check_triton_device(Ws[0], "gptq_quantize_batched")
    for W, H, p in zip(Ws, Hs, per, strict=True):  # every argument checked before any work
        check_inputs(W, H, bits, group_size, block_size, damp, p["dxxt"], alpha, reg, None, p["name"], mse=mse)
        if p["factor"] is not None:
            _check_factor(p["factor"], W, factor_settings(act_order, damp, p["dxxt"], alpha, reg, None, None),
                          p["name"])
    if len({p["dxxt"] is None for p in per}) != 1:
        raise ValueError("dxxts must be given for every weight or for none")
    bits = int(bits)
    with ieee_fp32_matmul():
        preps = [prepare(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                         static_groups=static_groups, damp=damp, block_size=block_size, mse=mse, dxxt=p["dxxt"],
                         alpha=alpha, reg=reg, name=p["name"], shared=p["factor"])
                 for W, H, p in zip(Ws, Hs, per, strict=True)]
        with torch.cuda.device(Ws[0].device) if Ws[0].device.type == "cuda" else contextlib.nullcontext():
            swept = gptq_sweep_triton_batched(preps, bits, group_size, sym, mse)
        return [_assemble(W, H, prep, codes, scales, zeros, bits, group_size, sym, compute_loss, p["name"])
                for W, H, prep, (codes, scales, zeros), p in zip(Ws, Hs, preps, swept, per, strict=True)]


def _check_factor(f, W, want: dict, name) -> None:
    where = f" (layer {name})" if name else ""
    if not isinstance(f, HessianFactor):
        raise ValueError(f"factor must come from gptq_factor, got {type(f).__name__}{where}")
    if f.U.shape[0] != W.shape[1] or f.U.device != W.device:
        raise ValueError(f"factor is for K = {f.U.shape[0]} on {f.U.device}, W is [N, {W.shape[1]}] on {W.device}"
                         f"{where}")
    other = {k: (f.settings[k], v) for k, v in want.items() if f.settings[k] != v}
    if other:
        said = ", ".join(f"{k}={a!r} (this call: {b!r})" for k, (a, b) in other.items())
        raise ValueError(f"factor was made with {said}: pass gptq_quantize the arguments gptq_factor had{where}")


__all__ = ["GPTQResult", "HessianFactor", "NotPositiveDefiniteError", "gptq_factor", "gptq_quantize",
           "gptq_quantize_batched"]
