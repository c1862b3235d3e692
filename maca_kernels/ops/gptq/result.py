"""The result of ``gptq_quantize``: codes and parameters in W's orientation, plus the checkpoint view."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GPTQResult:
    codes: torch.Tensor  # int32 [N, K], values in [0, 2^bits − 1]
    scales: torch.Tensor  # fp32 [N, G] (fp16-representable)
    zeros: torch.Tensor  # int32 [N, G], true zero points (never 0 unless the caller gave zeros)
    g_idx: torch.Tensor  # int32 [K]: group of each input column
    weight: torch.Tensor  # fp32 [N, K] = (codes − zeros[:, g_idx]) · scales[:, g_idx]
    loss: float  # tr(ΔW H ΔWᵀ) with the H passed in
    damp: float  # damping actually used, as a fraction of mean(diag H)
    bits: int
    group_size: int
    sym: bool
    perm: torch.Tensor  # int64 [K]: processing order (act-order permutation, identity otherwise)

    def to_gptq(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """Checkpoint tensors: qweight int32 [K·bits/32, N], qzeros int32 [G, N·bits/32],
        scales fp16 [G, N], g_idx int32 [K]. ``checkpoint_format`` "gptq" (v1, zeros stored minus one)
        or "gptq_v2" (true zeros)."""
        from ...formats.gptq import pack_gptq, pack_gptq_zeros, pack_scales

        return {
            "qweight": pack_gptq(self.codes, self.bits),
            "qzeros": pack_gptq_zeros(self.zeros, self.bits, checkpoint_format=checkpoint_format),
            "scales": pack_scales(self.scales),
            "g_idx": self.g_idx.to(torch.int32),
        }
