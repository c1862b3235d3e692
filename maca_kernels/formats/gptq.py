"""The GPTQ checkpoint packing format (GPTQ-for-LLaMa / AutoGPTQ / GPTQModel), in plain PyTorch.

Checkpoint tensors of one linear layer with ``N`` outputs, ``K`` inputs and ``G`` groups:

- ``qweight`` int32 ``[K·bits/32, N]``: codes packed along K;
- ``qzeros``  int32 ``[G, N·bits/32]``: zero points packed along N;
- ``scales``  fp16  ``[G, N]``;
- ``g_idx``   int32 ``[K]``: the group of each input column.

Packing rule. A run of ``P`` consecutive values (``P = 32/bits`` for 2/4/8 bits, ``P = 32`` for
3 bits) fills ``P·bits/32`` consecutive words as one little-endian bit stream: value ``j`` of the
run starts at stream bit ``j·bits``, i.e. word ``j·bits // 32`` at shift ``j·bits % 32``. For 2/4/8
bits a value never straddles a word; for 3 bits, v10 and v21 do (v10: low 2 bits at bits 30–31 of
w0, bit 2 at bit 0 of w1; v21: bit 0 at bit 31 of w1, bits 1–2 at bits 0–1 of w2), which is exactly
the GPTQ 3-bit layout.

Words are raw 32-bit patterns: shifting is done in int64 on values in ``[0, 2³²)`` and converted
back to int32 with explicit two's-complement wraparound, so bit 31 round-trips.

Zero points: ``checkpoint_format="gptq"`` (v1) stores ``zero − 1`` in each field, ``"gptq_v2"`` the true
zero. Readers of v1 that add 1 to the whole packed word (instead of per field) carry into the
neighbouring field when a stored field is all-ones, so v1 packing refuses ``zero == 0``.
"""

from __future__ import annotations

import operator
import warnings

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

_MASK32 = 0xFFFFFFFF
_FP16_MAX = torch.finfo(torch.float16).max

__all__ = [
    "CHECKPOINT_FORMATS",
    "SUPPORTED_BITS",
    "check_bits",
    "check_checkpoint_format",
    "check_group_size",
    "check_packable_len",
    "dequantize_gptq",
    "pack_gptq",
    "pack_gptq_zeros",
    "pack_scales",
    "unpack_gptq",
    "unpack_gptq_zeros",
    "unpack_scales",
]


# ----------------------------------------------------------------------------------------------
# validation helpers


def check_bits(bits, where: str = "") -> int:
    """``bits`` as an int in SUPPORTED_BITS. bool and float are refused (``4.0 in SUPPORTED_BITS`` holds, but the
    kernels take an int). ``where`` ends the message (e.g. " (layer q_proj)")."""
    try:
        b = None if isinstance(bits, bool) else operator.index(bits)
    except TypeError:
        b = None
    if b not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}{where}")
    return b


def check_group_size(group_size, K: int, where: str = "") -> int:
    """``group_size`` as an int: -1 (one group) or a positive divisor of ``K`` (in_features)."""
    g = group_size
    if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or (g > 0 and K % g == 0)):
        raise ValueError(f"group_size must be -1 (one group) or a positive divisor of in_features = {K}, "
                         f"got {group_size!r}{where}")
    return g


def check_checkpoint_format(checkpoint_format) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return checkpoint_format


def _run_len(bits: int) -> int:
    """Values per packing run: 32 for 3-bit (3 words), 32/bits otherwise (1 word)."""
    return 32 if bits == 3 else 32 // bits


def check_packable_len(length: int, bits: int, name: str, what: str) -> None:
    p = _run_len(bits)
    if length % p:
        layout = "32 values into 3 words" if bits == 3 else f"{p} values per int32 word"
        raise ValueError(
            f"{name} = {length} must be a multiple of {p} for bits={bits} "
            f"(the GPTQ format packs {what} {layout})"
        )


def _check_dim(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v}")
    return v


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_int_2d(t, name: str, layout: str) -> None:
    _check_tensor(t, name)
    if not _is_integer_dtype(t.dtype):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout}, got shape {tuple(t.shape)}")


def _check_int32_2d(t, name: str, layout: str) -> None:
    _check_tensor(t, name)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor (raw packed 32-bit words), got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout}, got shape {tuple(t.shape)}")


def _check_range(v: torch.Tensor, lo: int, hi: int, name: str, bits: int, why: str = "") -> None:
    """``v`` int64; every entry must lie in ``[lo, hi]``."""
    if v.numel() == 0:
        return
    vmin, vmax = (int(x) for x in torch.stack(torch.aminmax(v)).tolist())
    if vmin < lo or vmax > hi:
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}] for bits={bits}{why}, got values in [{vmin}, {vmax}]"
        )


# ----------------------------------------------------------------------------------------------
# the bit stream (packs along dim 0)


def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2³²) → int32 with the same 32-bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 ``[L, M]`` in ``[0, 2^bits)`` → int32 ``[L·bits/32, M]`` (L already checked)."""
    p = _run_len(bits)
    w = p * bits // 32
    length, m = values.shape
    v = values.reshape(length // p, p, m)
    out = torch.zeros(length // p, w, m, dtype=torch.int64, device=values.device)
    for j in range(p):
        word, shift = divmod(j * bits, 32)
        out[:, word] |= (v[:, j] << shift) & _MASK32
        if shift + bits > 32:  # straddles into the next word (3-bit v10, v21)
            out[:, word + 1] |= v[:, j] >> (32 - shift)
    return _to_int32_words(out.reshape(length // p * w, m))


def _unpack_dim0(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[L·bits/32, M]`` → int64 ``[L, M]`` in ``[0, 2^bits)``."""
    p = _run_len(bits)
    w = p * bits // 32
    rows, m = words.shape
    u = (words.to(torch.int64) & _MASK32).reshape(rows // w, w, m)
    field = (1 << bits) - 1
    vals = []
    for j in range(p):
        word, shift = divmod(j * bits, 32)
        v = (u[:, word] >> shift) & field
        if shift + bits > 32:
            v = v | ((u[:, word + 1] << (32 - shift)) & field)
        vals.append(v)
    return torch.stack(vals, dim=1).reshape(rows // w * p, m)


# ----------------------------------------------------------------------------------------------
# qweight


def pack_gptq(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K]`` (values in ``[0, 2^bits − 1]``) into GPTQ ``qweight`` int32
    ``[K·bits/32, N]``, packed along K. K must be a multiple of 32/bits (32 for 3-bit); N is free."""
    bits = check_bits(bits)
    _check_int_2d(codes, "codes", "[N, K] (out_features × in_features)")
    check_packable_len(codes.shape[1], bits, "K (codes.shape[1])", "the in_features dimension")
    c = codes.detach().to(torch.int64)
    _check_range(c, 0, (1 << bits) - 1, "codes", bits)
    return _pack_dim0(c.t(), bits).contiguous()


def unpack_gptq(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_gptq`: ``qweight`` int32 ``[K·bits/32, N]`` → codes int32 ``[N, K]``."""
    bits = check_bits(bits)
    K = _check_dim(K, "K")
    check_packable_len(K, bits, "K", "the in_features dimension")
    _check_int32_2d(qweight, "qweight", "[K·bits/32, N]")
    rows = K * bits // 32
    if qweight.shape[0] != rows:
        raise ValueError(
            f"qweight must have K·bits/32 = {K}·{bits}/32 = {rows} rows for K = {K}, "
            f"got shape {tuple(qweight.shape)}"
        )
    return _unpack_dim0(qweight.detach(), bits).t().to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------------------
# qzeros


def pack_gptq_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Pack zero points ``[N, G]`` (W's orientation) into GPTQ ``qzeros`` int32 ``[G, N·bits/32]``,
    packed along N. ``checkpoint_format="gptq"`` (v1) stores ``zero − 1`` and refuses ``zero == 0``;
    ``"gptq_v2"`` stores the true zero. N must be a multiple of 32/bits (32 for 3-bit)."""
    bits = check_bits(bits)
    checkpoint_format = check_checkpoint_format(checkpoint_format)
    _check_int_2d(zeros, "zeros", "[N, G] (out_features × groups)")
    check_packable_len(zeros.shape[0], bits, "N (zeros.shape[0])", "the out_features dimension of qzeros")
    z = zeros.detach().to(torch.int64)
    maxq = (1 << bits) - 1
    if checkpoint_format == "gptq":
        if z.numel() and bool((z == 0).any()):
            raise ValueError(
                'zeros contains a zero point of 0, which checkpoint_format="gptq" (v1) cannot store: v1 stores '
                "zero − 1, so 0 becomes an all-ones field and readers that add 1 to the whole packed word "
                'carry into the neighbouring zero. Use checkpoint_format="gptq_v2" or a quantizer that keeps zeros ≥ 1'
            )
        _check_range(z, 1, maxq, "zeros", bits, ' with checkpoint_format="gptq"')
        z = z - 1
    else:
        _check_range(z, 0, maxq, "zeros", bits)
    return _pack_dim0(z, bits).t().contiguous()


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int, N: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Inverse of :func:`pack_gptq_zeros`: ``qzeros`` int32 ``[G, N·bits/32]`` → zeros int32 ``[N, G]``.
    For v1 each field is unpacked first and 1 added per field (never across the word), so an
    all-ones v1 field reads back as ``2^bits``."""
    bits = check_bits(bits)
    checkpoint_format = check_checkpoint_format(checkpoint_format)
    N = _check_dim(N, "N")
    check_packable_len(N, bits, "N", "the out_features dimension of qzeros")
    _check_int32_2d(qzeros, "qzeros", "[G, N·bits/32]")
    cols = N * bits // 32
    if qzeros.shape[1] != cols:
        raise ValueError(
            f"qzeros must have N·bits/32 = {N}·{bits}/32 = {cols} columns for N = {N}, "
            f"got shape {tuple(qzeros.shape)}"
        )
    z = _unpack_dim0(qzeros.detach().t(), bits)  # [N, G]
    if checkpoint_format == "gptq":
        if not _WARNED_ALL_ONES and bool((z == (1 << bits) - 1).any()):
            _warn_all_ones(bits)
        z = z + 1
    return z.to(torch.int32).contiguous()


_WARNED_ALL_ONES = False


def _warn_all_ones(bits: int) -> None:
    """A v1 field of all ones reads as zero 2^bits (as the format defines), but some writers stored a zero of 0
    there (0 − 1 wrapped), and readers disagree on it: say so once per process."""
    global _WARNED_ALL_ONES
    _WARNED_ALL_ONES = True
    warnings.warn(
        f"a v1 ('gptq') qzeros field is all ones: read as zero {1 << bits} as the format defines; a writer that "
        "meant zero 0 wrapped it (readers disagree on such checkpoints; v2 ('gptq_v2') stores zeros as they are)",
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------
# scales


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales ``[N, G]`` (any float dtype) → checkpoint fp16 ``[G, N]``. Raises if a scale is NaN/Inf,
    overflows fp16 or is nonzero but rounds to 0 in fp16."""
    _check_tensor(scales, "scales")
    if not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be a floating-point tensor, got dtype {scales.dtype}")
    if scales.dim() != 2:
        raise ValueError(f"scales must be 2-D [N, G] (out_features × groups), got shape {tuple(scales.shape)}")
    s = scales.detach()
    s16 = s.to(torch.float16)
    if s.numel():
        if not bool(torch.isfinite(s).all()):
            raise ValueError("scales contains NaN or Inf: every scale must be finite")
        if not bool(torch.isfinite(s16).all()):
            big = float(s.abs().max())
            raise ValueError(
                f"scales overflow float16: max |scale| = {big:.6g} exceeds the fp16 maximum {_FP16_MAX:.0f}"
            )
        under = (s16 == 0) & (s != 0)
        if bool(under.any()):
            tiny = float(s[under].abs().max())
            raise ValueError(
                f"scales underflow float16: a nonzero scale (|scale| up to {tiny:.3g}) rounds to 0 in fp16 "
                f"(smallest positive fp16 is {torch.finfo(torch.float16).smallest_normal * 2.0**-10:.3g})"
            )
    return s16.t().contiguous()


def _unpack_scales(scales_ckpt, name: str) -> torch.Tensor:
    _check_tensor(scales_ckpt, name)
    if not scales_ckpt.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {scales_ckpt.dtype}")
    if scales_ckpt.dim() != 2:
        raise ValueError(f"{name} must be 2-D [G, N] (groups × out_features), got shape {tuple(scales_ckpt.shape)}")
    return scales_ckpt.detach().to(torch.float32).t().contiguous()


def unpack_scales(scales_ckpt: torch.Tensor) -> torch.Tensor:
    """Checkpoint scales ``[G, N]`` (fp16) → fp32 ``[N, G]``."""
    return _unpack_scales(scales_ckpt, "scales_ckpt")


# ----------------------------------------------------------------------------------------------
# dequantization


def dequantize_gptq(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """``W[n, k] = (code[n, k] − zero[n, g_idx[k]]) · scale[n, g_idx[k]]`` as fp32 ``[N, K]`` from the
    checkpoint tensors: ``qweight`` int32 ``[K·bits/32, N]``, ``scales`` ``[G, N]`` (fp16),
    ``qzeros`` int32 ``[G, N·bits/32]``, ``g_idx`` int ``[K]``. K is ``len(g_idx)``.
    The result is exact: (code − zero) is a small integer and scales are fp16."""
    bits = check_bits(bits)
    checkpoint_format = check_checkpoint_format(checkpoint_format)
    _check_tensor(g_idx, "g_idx")
    if not _is_integer_dtype(g_idx.dtype):
        raise TypeError(f"g_idx must be an integer tensor, got dtype {g_idx.dtype}")
    if g_idx.dim() != 1:
        raise ValueError(f"g_idx must be 1-D [K] (the group of each input column), got shape {tuple(g_idx.shape)}")
    _check_int32_2d(qweight, "qweight", "[K·bits/32, N]")
    s = _unpack_scales(scales, "scales")
    _check_tensor(qzeros, "qzeros")
    if scales.device != qweight.device or qzeros.device != qweight.device:
        raise ValueError(
            f"qweight, scales and qzeros must be on one device, got {qweight.device}, {scales.device}, {qzeros.device}"
        )
    n, g = s.shape
    if qweight.shape[1] != n:
        raise ValueError(
            f"scales must be [G, N] with N = qweight.shape[1] = {qweight.shape[1]}, got shape {tuple(scales.shape)}"
        )
    K = g_idx.shape[0]
    codes = unpack_gptq(qweight, bits, K)
    zeros = unpack_gptq_zeros(qzeros, bits, n, checkpoint_format)
    if zeros.shape[1] != g:
        raise ValueError(
            f"qzeros has {zeros.shape[1]} group rows but scales has G = {g}: both must be [G, ...], "
            f"got qzeros {tuple(qzeros.shape)} and scales {tuple(scales.shape)}"
        )
    idx = g_idx.detach().to(device=qweight.device, dtype=torch.int64)
    if K:
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(idx)).tolist())
        if lo < 0 or hi >= g:
            raise ValueError(f"g_idx must lie in [0, G − 1] = [0, {g - 1}], got values in [{lo}, {hi}]")
    diff = (codes - zeros[:, idx]).to(torch.float32)
    return diff * s[:, idx]
