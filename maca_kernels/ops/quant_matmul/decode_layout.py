"""The decode layout: act-order weights with the rows of K in group order, converted once at load.

A GPTQ act-order checkpoint (``desc_act``) keeps the rows of K in input order and names each row's group
in ``g_idx``; the groups are scattered along K, so a kernel reading it must fetch a scale and a zero point
per element (the slow gather path). The product is the same sum in any order of K:

    x @ dequant(W)ᵀ = x[..., perm] @ dequant(W)[:, perm]ᵀ    with perm sorting g_idx (stable),

and when every group then fills ``group_size`` consecutive rows (what GPTQ's act-order and static groups
produce), the permuted layer is a plain grouped one: the kernels run their sorted schedule and the only
extra work per call is one gather of x. The conversion moves whole codes (unpack, permute rows, repack), so
it is lossless: :meth:`DecodeWeight.to_checkpoint` gives back the checkpoint tensors bit for bit.

A ``g_idx`` whose groups are not all the same size (hand-made checkpoints) is still put in group order,
and keeps a sorted ``g_idx`` for the kernels' gather path.

``to_decode_weight(..., mma=True)`` also builds the layout of the CUDA tensor-core GEMV (``mma_layout.py``,
int2/int3/int4, fp16 or bf16 x), run by ``matmul(x, backend="cuda")``: the CUDA GEMV up to 16 rows, the
Triton kernels on the same layout above.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...formats.gptq import _pack_dim0, _unpack_dim0, pack_gptq, unpack_gptq, unpack_gptq_zeros
from . import mma_layout
from .validate import validate_quant_matmul

# Columns repacked at a time: bounds the int64 codes temporaries (unpacked and permuted) to 2 × K × this many
# values, 16 MB per 1024 rows of K (4096 columns made it ~720 MB of GPU memory at K = 11008).
_REPACK_COLS = 1024


@dataclass(frozen=True)
class DecodeWeight:
    """One layer's packed weight as the kernels read it fastest. Build with :func:`to_decode_weight`.

    ``qweight`` int32 ``[K·bits/32, N]`` (GPTQ packing of the rows of K in group order), ``scales`` fp16
    ``[G, N]`` and ``qzeros`` int32 ``[G, N·bits/32]`` (as in the checkpoint), ``perm`` int64 ``[K]`` (row
    i holds input feature ``perm[i]``; None: rows already in input order), ``group_size`` (rows per group
    after sorting; −1: one group), ``g_idx`` (sorted, only when the groups differ in size; else None),
    ``checkpoint_g_idx`` (the checkpoint's own g_idx, None if it had none), ``mma`` (the CUDA GEMV's layout
    of the same rows, when built).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    perm: torch.Tensor | None
    g_idx: torch.Tensor | None
    checkpoint_g_idx: torch.Tensor | None
    bits: int
    group_size: int
    checkpoint_format: str
    mma: mma_layout.MmaWeight | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def matmul(self, x: torch.Tensor, *, backend: str | None = None, deterministic: bool = False) -> torch.Tensor:
        """``x [..., K] @ dequant(W)ᵀ`` → ``[..., N]``: the product ``quant_matmul`` gives on the checkpoint
        tensors, with x gathered once into the weight's row order."""
        if backend == "cuda":
            return self._matmul_cuda(x, deterministic)
        return decode_matmul(x, self.qweight, self.scales, self.qzeros, self.perm, self.g_idx, self.bits,
                             self.group_size, self.checkpoint_format, backend=backend, deterministic=deterministic)

    def _matmul_cuda(self, x: torch.Tensor, deterministic: bool) -> torch.Tensor:
        if self.mma is None:
            raise ValueError("backend='cuda' needs the mma layout: build with to_decode_weight(..., mma=True) "
                             "(int2/int3/int4, one group or group_size 128 (32 and 64 too at int4), K a multiple of "
                             "64 (int4) or 128)")
        return decode_matmul_cuda(x, self.mma, deterministic)

    def to_checkpoint(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors this weight was built from (``qweight``, ``qzeros``, ``scales`` and
        ``g_idx`` when the checkpoint had one), bit for bit."""
        out = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if self.perm is not None:
            out["qweight"] = permute_rows(self.qweight, torch.argsort(self.perm), self.bits)
        if self.checkpoint_g_idx is not None:
            out["g_idx"] = self.checkpoint_g_idx
        return out


def gather_x(x, perm: torch.Tensor | None, K: int) -> torch.Tensor:
    """x ``[..., K]`` in the weight's row order (x itself without a ``perm``)."""
    if perm is None:
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., K], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] with K = {K}, got shape {tuple(x.shape)}")
    if x.device != perm.device:
        raise ValueError(f"x is on {x.device} but the weight is on {perm.device}")
    return x.index_select(-1, perm)


def decode_matmul(x, qweight, scales, qzeros, perm, g_idx, bits: int, group_size: int, checkpoint_format: str, *,
                  backend: str | None = None, deterministic: bool = False) -> torch.Tensor:
    """``quant_matmul`` on decode-layout tensors (``perm`` as in :class:`DecodeWeight`)."""
    from .op import quant_matmul

    x = gather_x(x, perm, qweight.shape[0] * 32 // bits)
    return quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format, backend=backend,
                        deterministic=deterministic)


def decode_matmul_cuda(x, mma: mma_layout.MmaWeight, deterministic: bool = False) -> torch.Tensor:
    """``x [..., K] @ dequant(W)ᵀ`` on the mma layout of a decode-layout weight, x in input order (gathered by
    ``mma.perm``): the CUDA GEMV for 1–16 rows of a CUDA x, the Triton kernels on the same layout otherwise
    (more rows, a machine where the CUDA GEMV cannot compile, or CPU x under TRITON_INTERPRET=1), so a layer
    needs no other copy of its weight."""
    from ..._triton_utils import check_triton_device
    from .cuda_kernel import MAX_M, available, gemv_mma
    from .triton_kernel import launch_mma_matmul

    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != mma.K:
        raise ValueError(f"x must be a tensor [..., K] with K = {mma.K}, got {getattr(x, 'shape', type(x).__name__)}")
    x2 = x.reshape(-1, mma.K)
    if x.is_cuda and 1 <= x2.shape[0] <= MAX_M and available():
        y = gemv_mma(x2, mma, deterministic)
    else:
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"x must be float16 or bfloat16 for the mma layout's kernels, got {x.dtype}")
        check_triton_device(x, "quant_matmul (mma layout)")
        if x.device != mma.words.device:
            raise ValueError(f"the weight is on {mma.words.device} but x is on {x.device}")
        y = launch_mma_matmul(x2, mma, deterministic=deterministic)
    return y.reshape(*x.shape[:-1], mma.N)


def mma_qweight(mma: mma_layout.MmaWeight, device) -> torch.Tensor:
    """The GPTQ-packed ``qweight`` of the mma layout's rows (group order, as the decode layout holds them), built
    on ``device`` _REPACK_COLS columns at a time (each block is moved there first: its unpacked codes are 8 bytes
    per weight)."""
    out = torch.empty(mma.K * mma.bits // 32, mma.N, dtype=torch.int32, device=device)
    for n0 in range(0, mma.N, _REPACK_COLS):
        b = mma_layout.column_block(mma, n0, min(n0 + _REPACK_COLS, mma.n_pad))
        b = replace(b, words=b.words.to(device), hwords=b.hwords.to(device), scales=b.scales.to(device),
                    zeros=b.zeros.to(device))
        out[:, n0: n0 + b.N] = pack_gptq(mma_layout.unpack_mma(b)[0], mma.bits)
    return out


def permute_rows(qweight: torch.Tensor, perm: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` with its (packed) rows of K reordered: row i of the result is row ``perm[i]``."""
    out = torch.empty_like(qweight)
    for n0 in range(0, qweight.shape[1], _REPACK_COLS):
        cols = slice(n0, n0 + _REPACK_COLS)
        codes = _unpack_dim0(qweight[:, cols], bits)  # int64 [K, cols]
        out[:, cols] = _pack_dim0(codes.index_select(0, perm), bits)
    return out


def _uniform_group_size(sorted_g: torch.Tensor, G: int) -> int:
    """The group size if ``sorted_g`` is ``i // gs`` for every row i (every group the same size), else 0."""
    K = sorted_g.numel()
    if K % G:
        return 0
    gs = K // G
    expected = torch.arange(K, device=sorted_g.device) // gs
    return gs if torch.equal(sorted_g.to(expected.dtype), expected) else 0


def to_decode_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    checkpoint_format: str = "gptq",
    *,
    mma: bool = False,
) -> DecodeWeight:
    """Converts one layer's checkpoint tensors (the arguments of ``quant_matmul``, same checks and errors)
    into the decode layout. Sorted layers (``g_idx`` None or ``k // group_size``) keep their tensors as
    they are; act-order layers are repacked once, with rows of K in group order. Runs on the tensors'
    device; the inputs are not modified. ``mma=True`` also builds the CUDA GEMV's layout (ValueError if
    that kernel has no variant for these bits, groups and sizes)."""
    bits = int(bits)
    K = qweight.shape[0] * 32 // bits if isinstance(qweight, torch.Tensor) and qweight.dim() == 2 else 0
    probe = torch.empty(0, K, device=qweight.device if isinstance(qweight, torch.Tensor) else "cpu")
    # the g_idx range on any device: a sync on CUDA, once per layer here (quant_matmul skips it per call)
    shape = validate_quant_matmul(probe, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format,
                                  check_range=True)
    ckpt_g = g_idx.clone() if isinstance(g_idx, torch.Tensor) else None
    common = dict(scales=scales, qzeros=qzeros, checkpoint_g_idx=ckpt_g, bits=bits,
                  checkpoint_format=checkpoint_format)
    if shape.g_idx is None:
        return _with_mma(DecodeWeight(qweight=qweight, perm=None, g_idx=None, group_size=group_size, **common), mma)
    perm = torch.argsort(shape.g_idx, stable=True)
    sorted_g = shape.g_idx.index_select(0, perm)
    gs = _uniform_group_size(sorted_g, shape.G)
    if torch.equal(perm, torch.arange(K, device=perm.device)):
        perm_or_none, packed = None, qweight  # already in group order
    else:
        perm_or_none, packed = perm, permute_rows(qweight, perm, bits)
    if gs:
        return _with_mma(DecodeWeight(qweight=packed, perm=perm_or_none, g_idx=None, group_size=gs, **common), mma)
    if mma:
        raise ValueError("mma=True: the CUDA GEMV needs groups of one size (this g_idx has groups of several sizes)")
    return DecodeWeight(qweight=packed, perm=perm_or_none, g_idx=sorted_g.contiguous(), group_size=group_size,
                        **common)


def _with_mma(d: DecodeWeight, mma: bool) -> DecodeWeight:
    """Adds the CUDA GEMV's layout of d's (group-ordered) rows."""
    if not mma:
        return d
    K, N = d.in_features, d.out_features
    if not mma_layout.supports(d.bits, d.group_size, K, N):
        raise ValueError(f"mma=True: the CUDA GEMV has no kernel for bits={d.bits}, group_size={d.group_size}, "
                         f"K={K} (it runs int2/int3/int4 with one group or group_size 128, 32 and 64 too at int4, "
                         "and K a multiple of 64 at int4, of 128 otherwise)")
    codes = unpack_gptq(d.qweight, d.bits, K)
    zeros = unpack_gptq_zeros(d.qzeros, d.bits, N, d.checkpoint_format)
    packed = mma_layout.pack_mma(codes, zeros, d.scales.T, d.bits, d.group_size)
    perm = None if d.perm is None else d.perm.to(torch.int32)
    return replace(d, mma=replace(packed, perm=perm))
