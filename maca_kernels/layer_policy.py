"""Which parameters of a decoder layer ``quantize_model`` quantizes, which it keeps in float, and the error for
the rest: a floating matrix is never left in float silently.

- Quantized: the weight of every ``nn.Linear``, except a router and what ``keep_float`` names, and the fused 3-D
  experts of transformers 5's MoE models (``experts.gate_up_proj`` [E, 2I, d], ``experts.down_proj`` [E, d, I]),
  per expert (``pipeline/experts.py``); a fused variant whose arithmetic the pipeline does not reproduce (biases, a
  custom gate) raises ``UnsupportedExpertsError`` instead.
- Kept in float (the stated policy): 1-D parameters (norm scales, biases); routers (a module whose class name
  contains "Router", as transformers 5's ``*TopKRouter``, or an ``nn.Linear`` named ``gate`` / ``router`` beside
  an ``experts`` module); scalar gates (an ``nn.Linear`` with one output, e.g. Qwen2-MoE's
  ``shared_expert_gate``: one value per token, nothing to pack); every parameter ``keep_float`` names (a pattern
  matches a dotted name holding it as a run of whole parts, as ``overrides`` does: ``"experts"``, ``"down_proj"``,
  ``"mlp.experts.down_proj"``).
- Anything else raises ``UncoveredParameterError`` before any work is done, naming each parameter (e.g. a 3-D
  tensor of a module that is not a fused-experts module); ``keep_float`` keeps it in float knowingly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class UncoveredParameterError(ValueError):
    """A floating matrix of a decoder layer that would be neither quantized nor kept in float by the policy."""


_QUANTIZED = ("weight", "gate_up_proj", "down_proj")  # a Linear's weight, a fused-experts module's matrices


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` holds one of ``patterns`` as a run of whole dotted parts ("down_proj", "mlp.experts",
    "model.layers.1"): a module's name covers everything inside it."""
    return any(f".{p}." in f".{name}." for p in patterns)


def _is_router(layer: nn.Module, name: str, module: nn.Module) -> bool:
    if "Router" in type(module).__name__:
        return True
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    if isinstance(module, nn.Linear) and module.out_features == 1:
        return True  # a scalar gate
    return isinstance(module, nn.Linear) and child in ("gate", "router") and hasattr(parent, "experts")


def quantized_linears(layer: nn.Module, keep_float: Sequence[str] = (), prefix: str = "") -> dict[str, nn.Linear]:
    """The layer's ``nn.Linear`` modules that are quantized, by name within the layer (``keep_float`` is matched
    against ``prefix`` + name: the model's full names)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)
            and not _is_router(layer, name, m) and not matches(prefix + name, keep_float)}


def check_layers(layers_name: str, layers: nn.ModuleList, keep_float: Sequence[str] = ()) -> None:
    """Every floating parameter of every decoder layer quantized or kept in float by the policy, else the error."""
    from .pipeline.experts import find_experts

    uncovered = []
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}."
        quantized = set(quantized_linears(layer, keep_float, prefix).values())
        quantized |= {ex.module for ex in find_experts(layer, keep_float, prefix).values()}
        for mod_name, module in layer.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if (not p.is_floating_point() or p.dim() <= 1 or (module in quantized and p_name in _QUANTIZED)
                        or _is_router(layer, mod_name, module) or matches(prefix + name, keep_float)
                        or (mod_name and matches(prefix + mod_name, keep_float))):
                    continue
                uncovered.append(f"{prefix}{name} {list(p.shape)} ({type(module).__name__})")
    if uncovered:
        more = f" and {len(uncovered) - 6} more" if len(uncovered) > 6 else ""
        raise UncoveredParameterError(
            f"decoder layers hold floating matrices that quantize_model would leave in float without saying so: "
            f"{', '.join(uncovered[:6])}{more}. Only nn.Linear weights and fused MoE experts are quantized; pass "
            "keep_float=(...) naming them (CLI: --keep-float NAME) to keep them in float knowingly")
