"""What the pipeline needs to know of a Hugging Face causal LM: its decoder layers, the linear modules quantized
in each, how they group by shared input, and the inputs a layer or one of its modules sees."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layer_policy import matches, quantized_linears


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


@dataclass
class Batch:
    hidden: torch.Tensor  # [n, L, d]: n sequences of one length L
    kwargs: dict  # what the model passes its decoder layers for this batch (masks, rotary embeddings, ...)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the ModuleList with ``config.num_hidden_layers`` entries
    (``model.layers`` in Llama, Qwen2/3, Mistral and Gemma families)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return name, module
    arch = type(model).__name__
    raise ValueError(f"unsupported architecture {arch}: no ModuleList of {n} decoder layers found")


def linears(layer: nn.Module, keep_float: Sequence[str] = (), prefix: str = "") -> dict[str, nn.Linear]:
    """The linear modules quantized (layer_policy.py: not routers, not what keep_float names)."""
    return quantized_linears(layer, keep_float, prefix)


def module_settings(name: str, base: dict, overrides: dict | None) -> dict:
    s = dict(base)
    for pattern, over in (overrides or {}).items():
        if matches(name, [pattern]):
            s.update(over)
    return s


def swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def capture_first_inputs(model, id_batches, device) -> list[Batch]:
    """Run the model up to its first decoder layer for every batch (the model's own module, whose weights may
    be on the meta device); keep that layer's inputs on ``device``."""
    first_layer = decoder_layers(model)[1][0]
    captured: list[Batch] = []
    home = next(p.device for p in model.parameters() if not p.is_meta)

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        captured.append(Batch(hidden.detach().to(device), _to(kw, device)))
        raise StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in id_batches:
            try:
                model(input_ids=ids.to(home), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def group_linears(layer, mods: dict[str, nn.Linear], batch: Batch, experts: dict | None = None) -> list[list[str]]:
    """Linear modules grouped by the input they share, in the order the forward pass reaches them; each
    fused-experts module (``experts``: name -> module) a group of its own name, where the forward reaches it."""
    seen: list[tuple[str, torch.Tensor | None]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: seen.append((n, args[0])))
             for name, m in mods.items()]
    hooks += [m.register_forward_pre_hook(lambda mod, args, n=name: seen.append((n, None)))
              for name, m in (experts or {}).items()]
    try:
        with torch.no_grad():
            layer(batch.hidden, **batch.kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in seen:
        if x is None:  # fused experts
            if [name] not in groups:
                groups.append([name])
                inputs.append(None)
            continue
        for g, xi in zip(groups, inputs, strict=True):
            if xi is not None and (xi is x or (xi.shape == x.shape and xi.data_ptr() == x.data_ptr())):
                g.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    missing = (set(mods) | set(experts or {})) - {n for g in groups for n in g}
    if missing:
        raise RuntimeError(f"linear modules never called in a forward pass: {sorted(missing)}")
    return groups


def input_of(layer, module, batch: Batch) -> torch.Tensor:
    """The input ``module`` sees when ``layer`` runs on ``batch`` (the pass stops there)."""
    return call_of(layer, module, batch)[0][0]


def call_of(layer, module, batch: Batch) -> tuple[tuple, dict]:
    """The arguments ``module`` is called with when ``layer`` runs on ``batch`` (the pass stops there)."""
    seen = []

    def grab(mod, args, kwargs):
        seen.append((args, kwargs))
        raise StopForward

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        layer(batch.hidden, **batch.kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not reached in its layer's forward pass")
    return seen[0]


__all__ = ["Batch", "StopForward", "call_of", "capture_first_inputs", "decoder_layers", "first", "group_linears",
           "input_of", "linears", "module_settings", "swap"]
