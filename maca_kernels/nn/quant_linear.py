"""``QuantLinear``: a linear layer whose weight lives in the GPTQ checkpoint format."""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
from torch import nn

from .._triton_utils import INTERPRETING
from ..formats.gptq import check_bits, check_checkpoint_format, check_group_size, check_packable_len
from ..ops.quant_matmul.cuda_kernel import available as _cuda_gemv_available
from ..ops.quant_matmul.decode_layout import (
    decode_matmul,
    decode_matmul_cuda,
    mma_qweight,
    permute_rows,
    to_decode_weight,
)
from ..ops.quant_matmul.validate import check_g_idx_range, validate_quant_matmul


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)ᵀ + bias``. Its ``state_dict`` holds exactly the checkpoint tensors
    (``qweight``, ``qzeros``, ``scales``, ``g_idx`` and ``bias`` if any).

    Act-order layers are converted to the decode layout when their weights arrive (``from_gptq``,
    ``from_checkpoint``, ``load_state_dict``): the ``qweight`` buffer then holds the rows of K in group
    order and the non-persistent ``perm`` buffer the input order (see ``ops/quant_matmul/decode_layout.py``),
    so they run at the speed of sorted layers; ``state_dict()`` and ``checkpoint_tensors()`` convert back to
    the checkpoint layout. Read the checkpoint through those (not ``layer.qweight``, which pairs with
    ``perm``, not with ``g_idx``), and write new weights through the three entry points above.

    ``enable_cuda_gemv()`` opts in to the CUDA tensor-core GEMV (``csrc/quant_matmul/gemv_mma.cu``) for
    batches of 1–16 fp16 / bf16 rows on a GPU. The layer then keeps its weight in that kernel's layout only
    (larger batches run the Triton kernels on it; ``state_dict()`` still writes the checkpoint layout)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, checkpoint_format: str = "gptq", device=None) -> None:
        super().__init__()
        # refused here, not at the first forward (or as a ZeroDivisionError)
        bits = check_bits(bits)
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        check_packable_len(in_features, bits, "in_features", "the in_features dimension of qweight")
        check_packable_len(out_features, bits, "out_features", "the out_features dimension of qzeros")
        group_size = check_group_size(group_size, in_features)
        check_checkpoint_format(checkpoint_format)
        G = 1 if group_size == -1 else in_features // group_size
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        z = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **z))
        self.register_buffer("qzeros", torch.zeros(G, out_features * bits // 32, **z))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // max(in_features // G, 1)).to(
            torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        # The decode layout, set whenever the weights arrive (never inside forward: torch.compile).
        self.register_buffer("perm", None, persistent=False)  # act-order: input feature of each row of qweight
        self.register_buffer("kernel_g_idx", None, persistent=False)  # only for groups of unequal size
        self._kernel_group_size = group_size
        # The opt-in CUDA GEMV's layout (enable_cuda_gemv): non-persistent, rebuilt when the weights arrive. While
        # it is on, qweight is an empty placeholder: the layout holds the codes, and state_dict() repacks them.
        for name in ("mma_words", "mma_hwords", "mma_scales", "mma_zeros", "mma_perm"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def from_gptq(cls, q, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> QuantLinear:
        """From a ``gptq_quantize`` result (``q``), packing its codes into the checkpoint layout."""
        N, K = q.codes.shape
        layer = cls(K, N, q.bits, q.group_size, bias=bias is not None, checkpoint_format=checkpoint_format,
                    device=q.codes.device)
        for name, t in q.to_gptq(checkpoint_format).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias)
        layer._to_decode_layout()
        return layer

    @classmethod
    def from_checkpoint(cls, tensors: dict, bits: int, group_size: int, checkpoint_format: str = "gptq",
                        bias: torch.Tensor | None = None) -> QuantLinear:
        """From the checkpoint tensors of one layer: ``tensors`` holds ``qweight`` int32 [K·bits/32, N],
        ``qzeros`` int32 [G, N·bits/32], ``scales`` fp16 [G, N], ``g_idx`` int [K] (optional: defaults to
        ``k // group_size``) and optionally ``bias`` [N] (or pass ``bias=``). Checked by quant_matmul's own
        validation (ValueError naming the tensor); the tensors are copied, never reinterpreted."""
        unknown = set(tensors) - {"qweight", "qzeros", "scales", "g_idx", "bias"}
        if unknown:
            raise ValueError(f"unexpected checkpoint tensors {sorted(unknown)}; expected qweight, qzeros, scales, "
                             "g_idx and optionally bias")
        missing = [n for n in ("qweight", "qzeros", "scales") if n not in tensors]
        if missing:
            raise ValueError(f"missing checkpoint tensor(s) {missing}")
        if bias is not None and tensors.get("bias") is not None:
            raise ValueError("bias given twice: both in tensors and as bias=")
        bias = tensors.get("bias") if bias is None else bias
        qweight, g_idx = tensors["qweight"], tensors.get("g_idx")
        bits = check_bits(bits)
        if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D tensor [K·bits/32, N], got "
                             f"{getattr(qweight, 'shape', type(qweight).__name__)}")
        K = qweight.shape[0] * 32 // bits
        x = torch.empty(0, K, device=qweight.device)  # quant_matmul's checks need only x's shape and device
        # the group split against scales (g_idx=None), then g_idx itself
        shape = validate_quant_matmul(x, qweight, tensors["scales"], tensors["qzeros"], None, bits, group_size,
                                      checkpoint_format)
        if g_idx is not None:
            g_idx = validate_quant_matmul(x, qweight, tensors["scales"], tensors["qzeros"], g_idx, bits, group_size,
                                          checkpoint_format).g_idx
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (shape.N,)
                                 or not bias.dtype.is_floating_point):
            raise ValueError(f"bias must be a float tensor [N] = [{shape.N}], got {getattr(bias, 'shape', bias)}")
        layer = cls(K, shape.N, bits, group_size, bias=bias is not None, checkpoint_format=checkpoint_format,
                    device=qweight.device)
        for name, t in (("qweight", qweight), ("qzeros", tensors["qzeros"]), ("scales", tensors["scales"]),
                        ("g_idx", g_idx), ("bias", bias)):
            if t is not None:
                getattr(layer, name).copy_(t)
        layer._to_decode_layout()
        return layer

    def _to_decode_layout(self, rebind: bool = False) -> None:
        """qweight (checkpoint layout) → decode layout; checks the g_idx range (the one place it is checked
        for CUDA weights: quant_matmul skips it there, a host sync). ``rebind``: the buffer may be a
        caller's tensor (``load_state_dict(..., assign=True)``): replace it instead of writing into it."""
        if self.qweight.is_meta or self.g_idx.is_meta:
            return  # no values to convert yet (e.g. load_state_dict(meta tensors, assign=True))
        d = to_decode_weight(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.group_size,
                             self.checkpoint_format)  # k // group_size comes back as it is: no perm, no g_idx
        if d.qweight is not self.qweight:
            if rebind:
                self.qweight = d.qweight
            else:
                self.qweight.copy_(d.qweight)
        self.perm, self.kernel_g_idx, self._kernel_group_size = d.perm, d.g_idx, d.group_size

    def enable_cuda_gemv(self, enabled: bool = True) -> QuantLinear:
        """Opt in to (or out of) the CUDA tensor-core GEMV for batches of 1–16 fp16 / bf16 rows. Converts the
        weight to that kernel's layout and keeps it only there: larger batches run the Triton kernels on the
        same layout, ``state_dict()`` repacks the checkpoint layout, and ``enable_cuda_gemv(False)`` restores it
        (needed for CPU inputs, which the C++ kernel serves from the checkpoint layout). The layout is rebuilt
        whenever the weights arrive. ValueError if the kernel has no variant for these bits, groups and sizes
        (it runs int2/int3/int4 with one group or group size 128, 32 and 64 too at int4). Returns self."""
        if self.cuda_gemv:  # back to the checkpoint layout's codes first (never a stale layout)
            self.qweight = mma_qweight(self._mma(), self.mma_words.device)
            self.mma_words = self.mma_hwords = self.mma_scales = self.mma_zeros = self.mma_perm = None
        if not enabled:
            return self
        d = to_decode_weight(self.qweight, self.scales, self.qzeros, self.kernel_g_idx, self.bits,
                             self._kernel_group_size, self.checkpoint_format, mma=True)
        m = d.mma
        # scales as int16 bits: a module-wide .bfloat16() / .float() must not convert what the kernel reads
        self.mma_words, self.mma_hwords, self.mma_scales, self.mma_zeros = (m.words, m.hwords,
                                                                             m.scales.view(torch.int16), m.zeros)
        # the layout is built from qweight, already in group order: the kernel gathers x with the layer's perm
        self.mma_perm = None if self.perm is None else self.perm.to(torch.int32)
        self.qweight = self.qweight.new_empty(0, self.out_features)  # one packed copy: the layout's
        if self.qweight.is_cuda and not _cuda_gemv_available():
            warnings.warn("the CUDA GEMV cannot compile here (it needs torch.cuda._compile_kernel, NVRTC and "
                          "CUDA_HOME): batches of 1–16 rows run the Triton kernels on its layout instead", stacklevel=2)
        return self

    @property
    def cuda_gemv(self) -> bool:
        return self.mma_words is not None

    @property
    def cuda_gemv_supported(self) -> bool:
        """Whether the CUDA GEMV has a kernel for this layer (bits, group size, K; groups of one size)."""
        from ..ops.quant_matmul.mma_layout import supports

        return self.kernel_g_idx is None and supports(self.bits, self._kernel_group_size, self.in_features,
                                                      self.out_features)

    def _mma(self):
        from ..ops.quant_matmul.mma_layout import MmaWeight

        group = self.in_features if self._kernel_group_size == -1 else self._kernel_group_size
        return MmaWeight(self.mma_words, self.mma_hwords, self.mma_scales.view(torch.float16), self.mma_zeros,
                         self.bits, group, self.in_features, self.out_features, self.mma_perm)

    @property
    def act_order(self) -> bool:
        """True when ``g_idx`` is not ``k // group_size`` (an act-order checkpoint)."""
        return self.perm is not None or self.kernel_g_idx is not None

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors (what ``state_dict()`` writes): for an act-order layer ``qweight`` in the
        checkpoint's row order, which the ``qweight`` buffer does not hold (it holds the kernels' order)."""
        return dict(self.state_dict())

    def _checkpoint_qweight(self, device=None) -> torch.Tensor:
        """qweight in the checkpoint's row order, on ``device`` (default: the layer's)."""
        qweight = mma_qweight(self._mma(), device or self.qweight.device) if self.cuda_gemv else self.qweight
        if self.perm is not None:
            qweight = permute_rows(qweight, torch.argsort(self.perm.to(qweight.device)), self.bits)
        return qweight if device is None else qweight.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda_gemv:
            if not x.is_cuda and not INTERPRETING:
                raise ValueError(f"this layer keeps its weight in the CUDA GEMV's layout (enable_cuda_gemv()); x on "
                                 f"{x.device} needs the checkpoint layout back: layer.enable_cuda_gemv(False)")
            y = decode_matmul_cuda(x, self._mma())
        else:
            y = decode_matmul(x, self.qweight, self.scales, self.qzeros, self.perm, self.kernel_g_idx, self.bits,
                              self._kernel_group_size, self.checkpoint_format)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.perm is not None or self.cuda_gemv:
            destination[prefix + "qweight"] = self._checkpoint_qweight(_CHECKPOINT_QWEIGHT_DEVICE.get())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        errors = self._incoming_errors(state_dict, prefix)
        if errors:  # refused whole, before anything changes; torch raises it with the other modules' errors
            msg = f"{'; '.join(errors)} (QuantLinear({self.extra_repr()}): nothing of it was loaded)"
            error_msgs = _error_msgs(args, kwargs)
            if error_msgs is None:
                raise ValueError(msg)
            error_msgs.append(msg)
            return
        if not any(prefix + k in state_dict for k in ("qweight", "qzeros", "scales", "g_idx")):
            # nothing of the weight arrives (e.g. a bias, or a load aimed at other modules): keep the layout
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
            return
        self._check_incoming_g_idx(state_dict, prefix)  # before anything changes: a bad g_idx leaves the layer
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        cuda_gemv = self.cuda_gemv
        if self.perm is not None or cuda_gemv:  # back to the checkpoint layout first
            incoming = state_dict.get(prefix + "qweight")  # int32, the layer's shape: checked above
            if cuda_gemv and incoming is not None and not incoming.is_meta:  # it replaces qweight whole: no repack
                self.qweight = torch.empty(incoming.shape, dtype=torch.int32, device=self.mma_words.device)
            else:  # the state dict may not hold qweight
                ckpt = self._checkpoint_qweight()
                if assign or cuda_gemv:  # (the placeholder has no room for it)
                    self.qweight = ckpt
                else:
                    self.qweight.copy_(ckpt)
            self.perm, self.kernel_g_idx, self._kernel_group_size = None, None, self.group_size
            self.mma_words = self.mma_hwords = self.mma_scales = self.mma_zeros = self.mma_perm = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        self._to_decode_layout(rebind=assign)  # a new g_idx or qweight: convert again (never in the caller's)
        if cuda_gemv:
            try:
                self.enable_cuda_gemv()
            except ValueError as exc:  # reported with the other modules' errors: the rest of a model still loads
                error_msgs = _error_msgs(args, kwargs)
                if error_msgs is None:
                    raise
                error_msgs.append(f"{prefix or 'QuantLinear '}: the CUDA GEMV is now off: {exc}")

    def _incoming_errors(self, state_dict, prefix) -> list[str]:
        """The dtypes and shapes load_quantized accepts, and only those: a cast would change the packed words (or
        round the scales) and torch's own per-key shape check would load the tensors around a refused one."""
        K, N, G, b = self.in_features, self.out_features, self.scales.shape[0], self.bits
        want = {"qweight": (torch.int32, (K * b // 32, N)), "qzeros": (torch.int32, (G, N * b // 32)),
                "scales": (torch.float16, (G, N)), "g_idx": (torch.int32, (K,)), "bias": (None, (N,))}
        errors = []
        for name, (dtype, shape) in want.items():
            t, key = state_dict.get(prefix + name), prefix + name
            if t is None or (name == "bias" and self.bias is None):
                continue  # absent (strict loading reports it), or a bias this layer lacks (an unexpected key)
            if not isinstance(t, torch.Tensor):
                errors.append(f"{key} is a {type(t).__name__}, expected a tensor")
                continue
            if not (t.dtype.is_floating_point if dtype is None else t.dtype == dtype):
                errors.append(f"{key} has dtype {t.dtype}, expected {dtype or 'a floating dtype'}")
            if tuple(t.shape) != shape:
                errors.append(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        return errors

    def _check_incoming_g_idx(self, state_dict, prefix) -> None:
        g_idx = state_dict.get(prefix + "g_idx")  # int32 [K] if present (_incoming_errors)
        if g_idx is not None and not g_idx.is_meta:
            check_g_idx_range(g_idx, self.scales.shape[0], f"{prefix}g_idx")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _error_msgs(args, kwargs) -> list[str] | None:
    """torch's error_msgs argument of _load_from_state_dict (after strict, missing_keys, unexpected_keys)."""
    return args[3] if len(args) > 3 else kwargs.get("error_msgs")


_CHECKPOINT_QWEIGHT_DEVICE: contextvars.ContextVar[torch.device | str | None] = contextvars.ContextVar(
    "maca_checkpoint_qweight_device", default=None)


@contextlib.contextmanager
def checkpoint_qweights_on(device: torch.device | str):
    """Within it, ``state_dict()`` moves each act-order layer's checkpoint-order ``qweight`` (a permuted copy of
    the kernels' order) to ``device`` as soon as it is built: saving a GPU model then holds one layer's copy on
    the GPU at a time, not the whole model's (save_quantized uses it with "cpu")."""
    token = _CHECKPOINT_QWEIGHT_DEVICE.set(device)
    try:
        yield
    finally:
        _CHECKPOINT_QWEIGHT_DEVICE.reset(token)


def enable_cuda_gemv(model: nn.Module, enabled: bool = True) -> list[str]:
    """``QuantLinear.enable_cuda_gemv(enabled)`` on every QuantLinear of ``model`` that the CUDA GEMV has a
    kernel for (the others keep the default path); returns the names of the layers switched."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and (module.cuda_gemv_supported or not enabled):
            module.enable_cuda_gemv(enabled)
            names.append(name)
    return names
