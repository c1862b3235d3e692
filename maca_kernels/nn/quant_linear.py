"""``QuantLinear``: a linear layer whose weight lives in the GPTQ checkpoint format."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.quant_matmul.op import quant_matmul


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)ᵀ + bias``. Its ``state_dict`` holds exactly the checkpoint tensors
    (``qweight``, ``qzeros``, ``scales``, ``g_idx`` and ``bias`` if any)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, checkpoint_format: str = "gptq", device=None) -> None:
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
        G = 1 if group_size == -1 else in_features // group_size
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"in_features = {in_features} must be divisible by group_size = {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        z = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **z))
        self.register_buffer("qzeros", torch.zeros(G, out_features * bits // 32, **z))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // max(in_features // G, 1)).to(
            torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        self._gidx_trivial = True  # decided when g_idx changes, never inside forward (torch.compile)

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
        layer._gidx_trivial = layer._sorted_groups()
        return layer

    @classmethod
    def from_checkpoint(cls, tensors: dict, bits: int, group_size: int, checkpoint_format: str = "gptq",
                        bias: torch.Tensor | None = None) -> QuantLinear:
        """From the checkpoint tensors of one layer: ``tensors`` holds ``qweight`` int32 [K·bits/32, N],
        ``qzeros`` int32 [G, N·bits/32], ``scales`` fp16 [G, N], ``g_idx`` int32 [K] (optional: defaults to
        ``k // group_size``) and optionally ``bias`` [N] (or pass ``bias=``). Shapes and dtypes are checked
        (ValueError naming the tensor); the tensors are copied, never reinterpreted."""
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
        unknown = set(tensors) - {"qweight", "qzeros", "scales", "g_idx", "bias"}
        if unknown:
            raise ValueError(f"unexpected checkpoint tensors {sorted(unknown)}; expected qweight, qzeros, scales, "
                             "g_idx and optionally bias")
        for name in ("qweight", "qzeros", "scales"):
            if name not in tensors:
                raise ValueError(f"missing checkpoint tensor {name!r}")
            if not isinstance(tensors[name], torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensors[name]).__name__}")
        if bias is not None and tensors.get("bias") is not None:
            raise ValueError("bias given twice: both in tensors and as bias=")
        bias = tensors.get("bias") if bias is None else bias
        qweight = tensors["qweight"]
        if qweight.dim() != 2:
            raise ValueError(f"qweight must be 2-D [K·bits/32, N], got shape {tuple(qweight.shape)}")
        N = qweight.shape[1]
        if tensors.get("g_idx") is not None:
            K = tensors["g_idx"].shape[0] if tensors["g_idx"].dim() == 1 else -1
            if K < 0:
                raise ValueError(f"g_idx must be 1-D [K], got shape {tuple(tensors['g_idx'].shape)}")
        else:
            K = qweight.shape[0] * 32 // bits
        if group_size != -1 and (group_size <= 0 or K % group_size):
            raise ValueError(f"in_features K = {K} must be divisible by group_size = {group_size}")
        G = 1 if group_size == -1 else K // group_size
        want = {"qweight": ((K * bits // 32, N), torch.int32), "qzeros": ((G, N * bits // 32), torch.int32),
                "scales": ((G, N), torch.float16), "g_idx": ((K,), torch.int32), "bias": ((N,), torch.float16)}
        if (K * bits) % 32 or (N * bits) % 32:
            raise ValueError(f"K = {K} and N = {N} must pack whole int32 words at bits={bits}")
        got = dict(tensors, bias=bias)
        for name, (shape, dtype) in want.items():
            t = got.get(name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for K={K}, N={N}, bits={bits}, "
                                 f"group_size={group_size}; got {tuple(t.shape)}")
            if t.dtype != dtype and not (name == "bias" and t.dtype.is_floating_point):
                raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        layer = cls(K, N, bits, group_size, bias=bias is not None, checkpoint_format=checkpoint_format,
                    device=qweight.device)
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            if got.get(name) is not None:
                getattr(layer, name).copy_(got[name])
        layer._gidx_trivial = layer._sorted_groups()
        return layer

    def _sorted_groups(self) -> bool:
        # Without act-order g_idx is k // group_size: the kernels then take the faster per-tile path.
        # Also the one place the g_idx range is checked for CUDA weights (quant_matmul skips it there: a sync).
        g = self.group_size if self.group_size != -1 else self.in_features
        g_idx, G = self.g_idx.cpu(), self.scales.shape[0]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
            raise ValueError(f"g_idx must lie in [0, G − 1] = [0, {G - 1}], got values in "
                             f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        return bool(torch.equal(g_idx, (torch.arange(self.in_features) // g).to(torch.int32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_idx = None if self._gidx_trivial else self.g_idx
        y = quant_matmul(x, self.qweight, self.scales, self.qzeros, g_idx, self.bits, self.group_size,
                         self.checkpoint_format)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._gidx_trivial = self._sorted_groups()  # a new g_idx: decide the kernel path again

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
