"""Mixture-of-experts experts kept per expert: ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, the names
published GPTQ MoE checkpoints use, each a ``QuantLinear`` (or, before quantization, a float ``nn.Linear``). It takes
the place of a fused-experts module (transformers 5) and is called like one: ``(hidden [T, d], top_k_index [T, k],
top_k_weights [T, k]) -> [T, d]``."""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class Experts(nn.Module):
    """Experts as separate modules; ``forward`` groups the tokens by expert and runs each active expert once on all
    of its tokens (one packed matmul per projection), then adds the outputs weighted by the router."""

    def __init__(self, experts: list[ExpertMLP], act_fn: nn.Module):
        super().__init__()
        for e, m in enumerate(experts):
            self.add_module(str(e), m)
        self.num_experts = len(experts)
        self.act_fn = act_fn

    def __getitem__(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    @classmethod
    def skeleton(cls, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module) -> Experts:
        """Float Linears on the meta device in every place, to be swapped for QuantLinear modules by name."""
        def lin(k, n):
            return nn.Linear(k, n, bias=False, device="meta")
        return cls([ExpertMLP(lin(hidden, intermediate), lin(hidden, intermediate), lin(intermediate, hidden))
                    for _ in range(num_experts)], act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for e in hit:
            if e >= self.num_experts:
                continue
            tok, slot = torch.where(top_k_index == e)
            x, m = hidden_states[tok], self[e]
            y = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None].to(y.dtype)).to(out.dtype))
        return out


__all__ = ["ExpertMLP", "Experts"]
