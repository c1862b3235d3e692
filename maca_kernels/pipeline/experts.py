"""Mixture-of-experts layers whose experts are one module of fused 3-D parameters (transformers 5: Mixtral, Qwen2/3-MoE,
DeepSeek-V3, OLMoE, ...): ``gate_up_proj`` [E, 2I, d] and ``down_proj`` [E, d, I] (or their transposes), called as
``experts(hidden [T, d], top_k_index [T, k], top_k_weights [T, k])``.

Each expert's gate, up and down projections are quantized as three matrices, named as published GPTQ MoE checkpoints
name them (``experts.{e}.gate_proj`` ...), from Hessians of the tokens routed to that expert. The module is found by
its parameters, not by the model's name, and checked before any work: our own forward of its layout must give the
module's output on a probe, so a variant whose arithmetic differs (biases, a custom gate, a norm after each
expert) is refused by name instead of being quantized wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_policy import matches


class UnsupportedExpertsError(ValueError):
    """A fused-experts module whose arithmetic the pipeline does not reproduce."""


@dataclass
class ExpertSlice:
    """One expert's projection as the solver sees it: ``weight`` [out, in] is a view into the fused parameter, so
    writing the quantized weight into it updates the module the forward passes run."""

    weight: torch.Tensor
    bias: None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class FusedExperts:
    name: str  # within the decoder layer, e.g. "mlp.experts"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.module, "is_transposed", False))

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate_up(0).shape[1]

    @property
    def intermediate(self) -> int:
        return self.gate_up(0).shape[0] // 2

    def gate_up(self, e: int) -> torch.Tensor:
        w = self.module.gate_up_proj.data[e]
        return w.T if self.transposed else w

    def down(self, e: int) -> torch.Tensor:
        w = self.module.down_proj.data[e]
        return w.T if self.transposed else w

    def slices(self) -> dict[str, ExpertSlice]:
        """Every expert's three projections by name within the layer (views into the fused parameters)."""
        out, inter = {}, self.intermediate
        for e in range(self.num_experts):
            gu = self.gate_up(e)
            out[f"{self.name}.{e}.gate_proj"] = ExpertSlice(gu[:inter])
            out[f"{self.name}.{e}.up_proj"] = ExpertSlice(gu[inter:])
            out[f"{self.name}.{e}.down_proj"] = ExpertSlice(self.down(e))
        return out

    def act(self) -> nn.Module:
        return self.module.act_fn

    def inner(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's input of its down projection for tokens ``x`` [T, d]."""
        gate, up = F.linear(x, self.gate_up(e)).chunk(2, dim=-1)
        return self.act()(gate) * up

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The module's output as the pipeline understands its layout (the self-check's side)."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(top_k_index == e)
            if tok.numel():
                y = F.linear(self.inner(e, x[tok]), self.down(e)) * top_k_weights[tok, slot, None]
                out.index_add_(0, tok, y.to(out.dtype))
        return out


def _is_fused(module: nn.Module) -> bool:
    p = dict(module.named_parameters(recurse=False))
    return any(t.dim() == 3 and t.is_floating_point() for t in p.values()) and "down_proj" in p


def find_experts(layer: nn.Module, keep_float=(), prefix: str = "") -> dict[str, FusedExperts]:
    """The layer's fused-experts modules that are quantized (not named by ``keep_float``), by name within the layer;
    an unsupported variant raises ``UnsupportedExpertsError`` naming it."""
    found = {}
    for name, m in layer.named_modules():
        if not _is_fused(m) or matches(prefix + name, keep_float):
            continue
        why = _unsupported(m)
        if why:
            raise UnsupportedExpertsError(
                f"{prefix}{name} ({type(m).__name__}): {why}; these experts cannot be quantized yet: pass "
                f"keep_float=({name.rpartition('.')[2]!r},) (CLI: --keep-float {name.rpartition('.')[2]}) to keep "
                "them in float knowingly")
        found[name] = FusedExperts(name, m)
    return found


def _unsupported(m: nn.Module) -> str | None:
    params = {n: tuple(p.shape) for n, p in m.named_parameters(recurse=False)}
    if set(params) != {"gate_up_proj", "down_proj"}:
        return f"parameters {sorted(params)}, expected exactly gate_up_proj and down_proj (no biases, no norm)"
    if getattr(m, "has_bias", False) or getattr(m, "has_post_expert_norm", False):
        return "biases or a norm after each expert"
    if getattr(m, "is_concatenated", True) is False:
        return "gate and up rows interleaved"
    if not isinstance(getattr(m, "act_fn", None), nn.Module):
        return "no act_fn module"
    E, a, b = params["gate_up_proj"]
    E2, c, d = params["down_proj"]
    two_i, hidden = (b, a) if getattr(m, "is_transposed", False) else (a, b)
    out, inner = (d, c) if getattr(m, "is_transposed", False) else (c, d)
    if E != E2 or two_i != 2 * inner or out != hidden:
        return f"shapes gate_up_proj {params['gate_up_proj']} and down_proj {params['down_proj']} do not fit"
    return None


def check_forward(ex: FusedExperts) -> None:
    """Our reading of the layout against the module's own forward on a random probe (every expert hit)."""
    p = ex.module.down_proj
    if p.is_meta:
        return  # a streamed model's skeleton: checked when its layer is loaded
    dtype, tol = p.dtype, (1e-4 if p.dtype in (torch.float32, torch.float64) else 2e-2)
    g = torch.Generator().manual_seed(0)
    E, d = ex.num_experts, ex.hidden
    T, k = 2 * E, min(2, E)
    x = torch.randn(T, d, generator=g).to(ex.module.down_proj.device, dtype)
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)[:, :k].to(x.device)
    w = torch.rand(T, k, generator=g).to(x.device, dtype)
    with torch.no_grad():
        theirs = ex.module(x, idx, w)
        ours = ex.forward(x, idx, w)
    scale = theirs.abs().max().clamp_min(1e-30)
    if not torch.isfinite(theirs).all() or (theirs - ours).abs().max() > tol * scale:
        raise UnsupportedExpertsError(
            f"{ex.name} ({type(ex.module).__name__}): its forward is not gate/up → act(gate)·up → down weighted by "
            "the router; these experts cannot be quantized yet: keep_float them to keep them in float knowingly")




def fused_module_of(model: nn.Module, name: str) -> str | None:
    """For ``name`` = "<experts>.<e>.<projection>": "<experts>" when that is a fused-experts module of ``model``."""
    head, _, proj = name.rpartition(".")
    parent, _, e = head.rpartition(".")
    if proj not in PROJECTIONS or not e.isdigit():
        return None
    try:
        m = model.get_submodule(parent)
    except AttributeError:
        return None
    return parent if _is_fused(m) else None


def make_room(root: nn.Module, names) -> list[tuple[str, nn.Module]]:
    """Each fused-experts module of ``root`` that holds one of ``names`` (``<experts>.<e>.<projection>``) replaced by
    an ``Experts`` module with a float Linear on the meta device in each place, ready for its QuantLinears; returns
    (name, the fused module) of each replacement, to undo it."""
    from ..nn.experts import Experts

    done = []
    for name in sorted({f for f in (fused_module_of(root, n) for n in names) if f is not None}):
        ex = FusedExperts(name, root.get_submodule(name))
        parent, _, child = name.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, child, Experts.skeleton(ex.num_experts, ex.hidden, ex.intermediate, ex.act()))
        done.append((name, ex.module))
    return done


__all__ = ["PROJECTIONS", "ExpertSlice", "FusedExperts", "UnsupportedExpertsError", "check_forward", "find_experts",
           "fused_module_of", "make_room"]
