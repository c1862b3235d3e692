"""Validation and the dense linear algebra that every GPTQ solver shares.

Dead columns, saliency regularisation, act-order permutation, damping (raised step by step until the
Cholesky factorisations succeed), the upper Cholesky factor ``U`` of ``H⁻¹``, the GPTAQ matrix ``P``
and static group parameters. The column sweep itself lives in ``reference.py`` / ``triton_kernel.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...formats.gptq import check_bits
from .quantizer import find_params

# Damping fractions tried after the requested one when H (+ damping) is not positive definite.
DAMP_STEPS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


class NotPositiveDefiniteError(RuntimeError):
    """H + the largest damping tried is still not positive definite."""


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Every GEMM of a solve (P, the lazy updates, the loss) is fp32: never let a global TF32 setting
    round them."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@dataclass
class Prepared:
    W: torch.Tensor  # [N, K] fp32, processing (permuted) order, dead columns zeroed; the sweep consumes it
    U: torch.Tensor  # [K, K] upper Cholesky factor of (H + damp)⁻¹ in processing order
    P: torch.Tensor | None  # [K, K] GPTAQ correction (strictly upper), or None
    perm: torch.Tensor  # [K] processing order → original column
    damp: float  # damping fraction actually used (relative to mean(diag H))
    group_of_pos: torch.Tensor  # [K] int64: group of the column processed at each position
    static_scale: torch.Tensor | None  # [N, G] parameters fixed before the sweep (original group order)
    static_zero: torch.Tensor | None
    block_size: int


def check_inputs(W, H, bits, group_size, block_size, damp, dxxt, alpha, reg, saliency, name,
                 scales=None, zeros=None, mse=False, damp_steps=None) -> None:
    where = f" (layer {name})" if name else ""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.dtype.is_floating_point:
        raise ValueError(f"W must be a floating-point [N, K] tensor{where}")
    N, K = W.shape
    if N == 0 or K == 0:
        raise ValueError(f"W must be non-empty, got shape {tuple(W.shape)}{where}")
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (K, K) or not H.dtype.is_floating_point:
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H must be a floating-point [K, K] = [{K}, {K}] tensor, got {got}{where}")
    if H.device != W.device:
        raise ValueError(f"H is on {H.device} but W is on {W.device}{where}")
    check_bits(bits, where)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"group_size must be -1 (one group per row) or a positive int, got {group_size!r}{where}")
    if group_size > 0 and K % group_size:
        raise ValueError(f"K = {K} (in_features) must be divisible by group_size = {group_size}{where}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}{where}")
    if not (isinstance(damp, (int, float)) and 0 <= damp < 100):
        raise ValueError(f"damp must be a fraction ≥ 0 of mean(diag H), got {damp!r}{where}")
    if dxxt is not None:
        if not isinstance(dxxt, torch.Tensor) or tuple(dxxt.shape) != (K, K):
            got = tuple(dxxt.shape) if isinstance(dxxt, torch.Tensor) else type(dxxt).__name__
            raise ValueError(f"dxxt (GPTAQ cross term) must be [K, K] = [{K}, {K}], got {got}{where}")
        if dxxt.device != W.device:
            raise ValueError(f"dxxt is on {dxxt.device} but W is on {W.device}{where}")
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha must be a number ≥ 0, got {alpha!r}{where}")
    if reg is not None and not (isinstance(reg, (int, float)) and reg >= 0):
        raise ValueError(f"reg must be a number ≥ 0, got {reg!r}{where}")
    if saliency is not None and (not isinstance(saliency, torch.Tensor) or tuple(saliency.shape) != (K,)):
        raise ValueError(f"saliency must be a [K] = [{K}] tensor{where}")
    check_fixed_params(scales, zeros, N, K, bits, group_size, mse, W.device, where)
    if damp_steps is not None:
        steps = list(damp_steps)
        if not all(isinstance(s, (int, float)) and damp < s < 100 for s in steps) or steps != sorted(steps):
            raise ValueError(f"damp_steps must be increasing fractions above damp = {damp}, got {damp_steps!r}{where}")
    for label, t in (("W", W), ("H", H), ("dxxt", dxxt), ("saliency", saliency)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{label} contains NaN or Inf{where}")


def check_fixed_params(scales, zeros, N, K, bits, group_size, mse, device, where="") -> None:
    """Group parameters given by the caller (e.g. another tool's observer): [N, G] scales > 0 and integer
    zeros in [0, 2^bits − 1], G = K/group_size (1 without groups)."""
    if scales is None and zeros is None:
        return
    if scales is None or zeros is None:
        raise ValueError(f"scales and zeros (fixed group parameters) must be given together{where}")
    if mse:
        raise ValueError(f"mse searches the group parameters: it cannot be combined with given scales/zeros{where}")
    G = K // group_size if group_size > 0 else 1
    for label, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N, G):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{label} must be a [N, G] = [{N}, {G}] tensor (G = K/group_size), got {got}{where}")
        if t.device != device:
            raise ValueError(f"{label} is on {t.device} but W is on {device}{where}")
    s = scales.to(torch.float32)
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"scales must be finite and > 0{where}")
    z = zeros.to(torch.float64)
    if not ((z == z.round()).all() and (z >= 0).all() and (z <= 2**bits - 1).all()):
        raise ValueError(f"zeros must be integers in [0, {2**bits - 1}] (true zero points for {bits} bits){where}")


def _upper_inverse_factor(H: torch.Tensor, mean_diag: float, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, or None if H + damping is not PD."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * mean_diag)
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd  # each K x K step is freed as soon as the next exists: two alive at a time, not four
    if info.item() != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if info.item() != 0 or not torch.isfinite(U).all():
        return None
    return U


@dataclass
class HessianFactor:
    """What a GPTQ solve derives from H alone (``gptq_factor``): every weight solved against the same Hessian with
    the same settings can share it, with the bits of its own factorisation (q/k/v, gate/up, an expert's gate/up)."""

    dead: torch.Tensor  # [K] bool: columns with diag(H) = 0 (zeroed in W)
    perm: torch.Tensor  # [K] processing order → original column
    U: torch.Tensor  # [K, K] upper Cholesky factor of (H + damp)⁻¹ in processing order
    P: torch.Tensor | None  # [K, K] GPTAQ correction (strictly upper), or None
    damp: float  # damping fraction actually used
    settings: dict  # what it was made with (act_order, damp, reg, alpha, ...): a solve must ask for the same


def factor(H, *, act_order, damp, dxxt=None, alpha=0.25, reg=None, saliency=None, name=None,
           damp_steps=None) -> HessianFactor:
    H = H.detach().to(torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    if dxxt is not None:
        dxxt = dxxt.detach().to(torch.float32).clone()
        dxxt[:, dead] = 0.0
        dxxt[dead, :] = 0.0
    mean_diag = H.diagonal().mean().item()
    if reg:
        # SARQC-style: λ·diag(s) pulls salient weights toward their original values; s defaults to the
        # normalised diag(H), so reg is a fraction of mean(diag H) like damp.
        s = saliency.to(H) if saliency is not None else H.diagonal() / mean_diag
        H.diagonal().add_(reg * mean_diag * s)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        H = H[perm][:, perm]
        dxxt = None if dxxt is None else dxxt[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    U, used = None, damp
    steps = (damp,) + tuple(s for s in DAMP_STEPS if s > damp) if damp_steps is None else (damp, *damp_steps)
    for used in steps:
        U = _upper_inverse_factor(H, mean_diag, used)
        if U is not None:
            break
    del H  # not needed past the factor (its copy, that is: the caller's H is the caller's)
    if U is None:
        where = f"layer {name}: " if name else ""
        raise NotPositiveDefiniteError(
            f"{where}H is not positive definite even with damping {steps[-1]}·mean(diag H) "
            "(check the calibration activations for this layer)"
        )
    P = None
    if dxxt is not None and alpha:
        P = alpha * ((dxxt @ U.T).triu(1)) @ U
    return HessianFactor(dead, perm, U, P, float(used),
                         factor_settings(act_order, damp, dxxt, alpha, reg, saliency, damp_steps))


def factor_settings(act_order, damp, dxxt, alpha, reg, saliency, damp_steps) -> dict:
    """What a HessianFactor depends on besides H: a solve given a factor must ask for the same."""
    return dict(act_order=bool(act_order), damp=damp, alpha=alpha if dxxt is not None else None, reg=reg or None,
                gptaq=dxxt is not None, saliency=saliency is not None, damp_steps=damp_steps)


def prepare(W, H, *, bits, group_size, sym, act_order, static_groups, damp, block_size, mse,
            dxxt=None, alpha=0.25, reg=None, saliency=None, name=None, scales=None, zeros=None,
            damp_steps=None, shared: HessianFactor | None = None) -> Prepared:
    """The weight's side of a solve, with the Hessian's side from ``shared`` or made here."""
    f = shared if shared is not None else factor(H, act_order=act_order, damp=damp, dxxt=dxxt, alpha=alpha, reg=reg,
                                                  saliency=saliency, name=name, damp_steps=damp_steps)
    W = W.detach().to(torch.float32).clone()
    K = W.shape[1]
    W[:, f.dead] = 0.0
    # Parameters fixed before the sweep: given by the caller, static groups, or the single group of
    # group_size = -1 (taken from the original weights, as GPTQ does).
    static_scale = static_zero = None
    g = group_size if group_size > 0 else K
    if scales is not None:
        static_scale, static_zero = scales.to(torch.float32).clone(), zeros.to(torch.float32).clone()
    elif static_groups or group_size <= 0:
        params = [find_params(W[:, i : i + g], bits, sym, mse) for i in range(0, K, g)]
        static_scale = torch.stack([p[0] for p in params], dim=1)
        static_zero = torch.stack([p[1] for p in params], dim=1)
    if act_order:
        W = W[:, f.perm]
    positions = torch.arange(K, device=W.device)
    group_of_pos = f.perm // g if static_scale is not None else positions // g
    # Dynamic groups must not straddle blocks: their parameters are taken from up-to-date weights.
    if group_size > 0 and not static_groups:
        block_size = max(1, block_size // group_size) * group_size
    return Prepared(W, f.U, f.P, f.perm, f.damp, group_of_pos, static_scale, static_zero, block_size)
