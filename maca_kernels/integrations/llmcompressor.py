"""llm-compressor on maca_kernels: ``GPTQModifier`` accumulates with our Hessian kernel and solves with
``gptq_quantize``, with MaCa (per-sequence) weighting one argument away::

    from maca_kernels.integrations import llmcompressor as mk_llmc
    with mk_llmc.backend(weighting="sequence"):           # or "token": the tool's own statistic
        oneshot(model=model, dataset=dataset, recipe=GPTQModifier(...))

llm-compressor fixes each module's scales and zero points with its weight observer before the solve; GPTQ
then only chooses the codes. The backend keeps that: the observer's parameters go to ``gptq_quantize`` as
given ``scales``/``zeros`` (compressed-tensors' signed codes shifted to ours, same dequantized values).
Mapped: int weights of 2/3/4/8 bits, strategies tensor/channel/group, symmetric or not, actorder
(None or "weight"/"static": processing order by diag(H), groups of original columns), block_size,
dampening_frac with the tool's policy when H + damping is not positive definite (that module falls back to
round-to-nearest, flagged as the tool does). Refused with ``UnsupportedOption``: float types (FP8, NVFP4),
a global scale, block strategy, non-Linear layers.

The tool's hook sees each batch as ``[B, L, d]`` without its attention mask, so with ``weighting="sequence"``
every row is one sequence of L tokens: calibrate with ``batch_size=1`` (the default) or unpadded batches.
"""

from __future__ import annotations

import math
import threading

import torch

from ..ops.gptq import NotPositiveDefiniteError, gptq_quantize
from ..ops.hessian import accumulate_hessian as mk_accumulate_hessian
from ._patch import Patch, check_version, neutralized, scoped, sequence_lengths

TESTED_VERSIONS = ("0.14",)
WEIGHTINGS = ("token", "sequence")


class UnsupportedOption(ValueError):
    """An llm-compressor option this backend cannot reproduce (raised instead of being ignored)."""


_lock = threading.Lock()
_active: dict | None = None
_originals: dict = {}  # the tool's functions, for a call that started before disable() returned


def enable(weighting: str = "token", *, op_backend: str | None = None) -> None:
    """Patch llm-compressor's GPTQModifier. ``weighting``: "token" reproduces the tool's Hessian
    (2·Σ xxᵀ over the batch rows' tokens, / rows), "sequence" is MaCa (each row one sample, weighted 1/L)."""
    global _active
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    with _lock:
        if _active is not None:
            raise RuntimeError("the maca_kernels llm-compressor backend is already enabled: disable() it first")
        version = check_version("llmcompressor", TESTED_VERSIONS)
        from llmcompressor.modifiers.gptq import base

        patch = Patch()
        _originals.update(accumulate_hessian=base.accumulate_hessian, quantize_weight=base.quantize_weight)
        patch.set(base, "accumulate_hessian", _accumulate_hessian)
        patch.set(base, "quantize_weight", _quantize_weight)
        _active = dict(weighting=weighting, op_backend=op_backend, patch=patch, version=version)


def disable() -> None:
    """Undo :func:`enable` (a no-op when not enabled)."""
    global _active
    with _lock:
        act, _active = _active, None
        if act is not None:
            act["patch"].undo()


def is_enabled() -> bool:
    return _active is not None


def backend(weighting: str = "token", *, op_backend: str | None = None):
    """``with backend(weighting="sequence"): oneshot(...)`` — enabled inside, restored on exit. An exception in the
    body propagates unchanged, with every patch undone."""
    return scoped(lambda: enable(weighting, op_backend=op_backend), disable, disable)


def _accumulate_hessian(inp, module, hessian, num_samples):
    """Drop-in for ``llmcompressor.modifiers.gptq.helpers.accumulate_hessian``: ``hessian += 2·Σ w XᵀX`` and
    ``num_samples += rows`` (the tool divides one by the other before the solve)."""
    act = _active  # one snapshot per call
    if act is None:
        return _originals["accumulate_hessian"](inp, module, hessian, num_samples)
    if not isinstance(module, torch.nn.Linear):
        raise UnsupportedOption(f"only nn.Linear layers are supported by the maca_kernels backend, got "
                                f"{type(module).__name__}")
    x = inp.to(device=hessian.device)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() > 3:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    rows = x.shape[0]
    if x.numel():
        x2, lengths = sequence_lengths(x, "GPTQModifier input")
        # √2·x in fp32, as the tool scales it: the factor 2 lands in the sum with no d×d temporary
        # no finiteness check: a NaN reaches H as in the tool, whose solve then falls back to round-to-nearest
        mk_accumulate_hessian(math.sqrt(2.0) * x2.to(torch.float32), lengths, weighting=act["weighting"],
                              out=hessian, check_finite=False, backend=act["op_backend"])
    num_samples += rows
    return hessian, num_samples


def _our_params(scale, zero_point, quant_args, N: int, K: int):
    """The observer's parameters as ours: [N, G] fp32 scales and true zeros in [0, 2^bits − 1]
    (compressed-tensors codes are signed, q ∈ [q_min, q_max]; ours are q − q_min)."""
    from compressed_tensors.quantization.utils import calculate_range

    strategy = str(getattr(quant_args.strategy, "value", quant_args.strategy))
    if quant_args.num_bits not in (2, 3, 4, 8):
        raise UnsupportedOption(f"num_bits = {quant_args.num_bits}; the backend solves 2, 3, 4 and 8 bits")
    q_min, q_max = (int(v) for v in calculate_range(quant_args, "cpu"))
    if q_max - q_min != 2**quant_args.num_bits - 1:
        raise UnsupportedOption(f"code range [{q_min}, {q_max}] is not the full {quant_args.num_bits}-bit range")
    if strategy == "group":
        group_size = int(quant_args.group_size)
        if K % group_size:
            raise UnsupportedOption(f"in_features = {K} is not a multiple of group_size = {group_size} (the "
                                    "backend has no partial last group)")
        shape = (N, K // group_size)
    elif strategy in ("channel", "tensor"):
        group_size, shape = -1, (N, 1)
    else:
        raise UnsupportedOption(f"strategy {strategy!r}; the backend maps tensor, channel and group")
    scales = scale.to(torch.float32).reshape(-1, scale.shape[-1] if scale.dim() else 1).expand(shape)
    if quant_args.symmetric or zero_point is None:
        zp = torch.zeros(shape, device=scale.device)
    else:
        zp = zero_point.to(torch.float32).reshape(-1, zero_point.shape[-1] if zero_point.dim() else 1).expand(shape)
    return scales.contiguous(), (zp - q_min).contiguous(), group_size


def _quantize_weight(weights, hessians, scale, zero_point, global_scale, quant_args, blocksize=128,
                     percdamp=0.01):
    """Drop-in for ``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight``: the same batch in, the
    same ``(quantized [B, N, K], losses [B], used_rtn_fallback [B])`` out."""
    act = _active  # one snapshot per call
    if act is None:
        return _originals["quantize_weight"](weights, hessians, scale, zero_point, global_scale, quant_args,
                                             blocksize, percdamp)
    t = str(getattr(quant_args.type, "value", quant_args.type))
    if t != "int":
        raise UnsupportedOption(f"weight type {t!r}: the backend solves integer weights")
    if global_scale is not None:
        raise UnsupportedOption("a global scale (e.g. NVFP4's tensor_group) is not supported")
    if quant_args.dynamic:
        raise UnsupportedOption("dynamic weight quantization is not supported")
    actorder = quant_args.actorder
    actorder = str(getattr(actorder, "value", actorder)) if actorder else None
    if actorder not in (None, "weight", "static"):
        raise UnsupportedOption(f"actorder {actorder!r}; the backend maps None and 'weight'/'static'")
    B, N, K = weights.shape
    out = torch.empty_like(weights)
    losses = torch.zeros(B, device=weights.device)
    fallback = torch.zeros(B, dtype=torch.bool, device=weights.device)
    for b in range(B):
        scales, zeros, group_size = _our_params(scale[b], None if zero_point is None else zero_point[b],
                                                quant_args, N, K)
        W, H = weights[b].to(torch.float32), hessians[b].to(torch.float32)
        opts = dict(bits=quant_args.num_bits, group_size=group_size, scales=scales, zeros=zeros,
                    block_size=int(blocksize), backend=act["op_backend"], compute_loss=False)
        try:
            if not torch.isfinite(H).all():
                raise NotPositiveDefiniteError("H is not finite")  # the tool's Cholesky fails the same way
            r = gptq_quantize(W, H, act_order=actorder is not None, damp=float(percdamp), damp_steps=(), **opts)
            Wn, Hd, _ = neutralized(W, H, float(percdamp))
        except NotPositiveDefiniteError:  # the tool's policy: identity factor, i.e. round-to-nearest
            Wn, _, _ = neutralized(W, H, 0.0)
            Hd = torch.eye(K, device=W.device)
            r = gptq_quantize(Wn, Hd, damp=0.0, **opts)
            fallback[b] = True
        dW = Wn - r.weight
        # Σ err²/2 of the sweep = ½·tr(ΔW H_d ΔWᵀ) (H_d the damped H; the identity for the fallback)
        losses[b] = 0.5 * ((dW @ Hd) * dW).sum()
        out[b] = r.weight.to(out.dtype)
    return out, losses, fallback
