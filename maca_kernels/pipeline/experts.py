"""The experts of mixture-of-experts layers, in the two forms models hold them:

- ``FusedExperts``: one module of fused 3-D parameters (transformers 5: Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE,
  ...): ``gate_up_proj`` [E, 2I, d] and ``down_proj`` [E, d, I] (or their transposes), called as
  ``experts(hidden [T, d], top_k_index [T, k], top_k_weights [T, k])``. Each expert's gate, up and down are
  quantized as three matrices named as published GPTQ MoE checkpoints name them (``experts.{e}.gate_proj`` ...).
- ``ExpertList``: an ``experts`` ModuleList of per-expert MLPs (older modelling code, remote-code models), each
  called by its MoE block with the tokens routed to it; its Linears keep their own names (``experts.{e}.w1`` ...).

Both are found by structure, not by the model's name, and checked on a probe before any work: the fused layout must
reproduce the module's own output; a list's experts must get rows of their block's input unchanged and feed one
Linear from the others. A variant that fails is refused by name instead of being quantized wrongly. Which tokens
each expert got is read from the forward pass itself (the fused call's ``top_k_index``; for a list, each expert's
rows found in the block's input), so the router's own rule is never reimplemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_policy import matches
from .model import Batch, StopForward, call_of


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
    fused = True

    @property
    def entry(self) -> nn.Module:
        """The module whose call marks where the forward pass reaches the experts."""
        return self.module

    @property
    def is_meta(self) -> bool:
        return self.module.down_proj.is_meta

    def stages(self, e: int) -> tuple[list[str], list[str]]:
        """Expert e's projections by name within the layer: those fed its routed tokens (gate, up), then down."""
        return [f"{self.name}.{e}.gate_proj", f"{self.name}.{e}.up_proj"], [f"{self.name}.{e}.down_proj"]

    def routed(self, call: tuple[tuple, dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """From the call of ``entry`` (args, kwargs) in a layer's forward: the tokens [n·L, d] (sequence-major)
        reaching the experts and the experts each is routed to, [n·L, k]."""
        args, kwargs = call
        return tuple(args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("hidden_states", "top_k_index")))

    def tokens(self, call: tuple[tuple, dict]) -> torch.Tensor:
        """The tokens alone (GPTAQ's full-precision stream, routed as the quantized one)."""
        return self.routed(call)[0]

    def check(self) -> None:
        check_forward(self)

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


@dataclass
class ExpertList:
    """An ``experts`` ModuleList of per-expert MLPs inside an MoE ``block``. ``first``: the Linears of each expert fed
    its routed tokens as they are (gate and up, or w1 and w3); ``second``: the one Linear fed what they make (down,
    w2). Found by a probe of the first expert's forward, so the names and the activation are the model's own."""

    name: str
    module: nn.ModuleList
    block: nn.Module
    first: tuple[str, ...]
    second: str
    fused = False

    @property
    def entry(self) -> nn.Module:
        return self.block

    @property
    def is_meta(self) -> bool:
        return self.module[0].get_submodule(self.second).weight.is_meta

    @property
    def num_experts(self) -> int:
        return len(self.module)

    @property
    def hidden(self) -> int:
        return self.module[0].get_submodule(self.first[0]).in_features

    @property
    def intermediate(self) -> int:
        return self.module[0].get_submodule(self.second).in_features

    def slices(self) -> dict[str, nn.Linear]:
        return {f"{self.name}.{e}.{n}": m.get_submodule(n) for e, m in enumerate(self.module)
                for n in (*self.first, self.second)}

    def stages(self, e: int) -> tuple[list[str], list[str]]:
        return [f"{self.name}.{e}.{n}" for n in self.first], [f"{self.name}.{e}.{self.second}"]

    def inner(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's input of its second Linear for tokens ``x`` [T, d], by its own forward."""
        m = self.module[e]
        return call_of(m, m.get_submodule(self.second), Batch(x, {}))[0][0]

    def routed(self, call: tuple[tuple, dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``FusedExperts.routed`` from the call of the block: its tokens [n·L, d] and the experts each reached,
        [n·L, k] (padded with E where a token reached fewer than k), read off the experts' calls when the block runs
        on that call."""
        args, kwargs = call
        return self._route(lambda: self.block(*args, **kwargs))

    def tokens(self, call: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = call
        x = args[0] if args else kwargs["hidden_states"]
        return x.reshape(-1, x.shape[-1])

    def _route(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        got: dict = {"x": None, "rows": [[] for _ in self.module]}

        def at_block(mod, args, kwargs):
            got["x"] = args[0] if args else kwargs["hidden_states"]

        def stop(mod, args, out):
            raise StopForward

        hooks = [self.block.register_forward_pre_hook(at_block, with_kwargs=True),
                 self.block.register_forward_hook(stop)]
        hooks += [m.register_forward_pre_hook(lambda mod, args, e=e: got["rows"][e].append(args[0]))
                  for e, m in enumerate(self.module)]
        try:
            run()
        except StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        if got["x"] is None:
            raise RuntimeError(f"{self.name}: its MoE block was not reached in the layer's forward pass")
        x = got["x"].reshape(-1, got["x"].shape[-1])
        E = self.num_experts
        hit = torch.zeros(x.shape[0], E, dtype=torch.bool, device=x.device)
        for e, rows in enumerate(got["rows"]):
            if not rows:
                continue
            pos = rows_of(x, torch.cat([r.reshape(-1, x.shape[-1]) for r in rows]))
            if pos is None:
                raise UnsupportedExpertsError(
                    f"{self.name}: expert {e} is not called with rows of its block's input as they are; these "
                    "experts cannot be quantized yet: keep_float them to keep them in float knowingly")
            hit[pos, e] = True
        k = max(1, int(hit.sum(1).max()))
        ids = torch.arange(E, device=x.device).expand_as(hit)
        return x, torch.where(hit, ids, E).sort(1).values[:, :k]

    def check(self) -> None:
        """The block on a random probe: every call of an expert must be rows of the block's input."""
        if self.is_meta:
            return
        w = self.module[0].get_submodule(self.first[0]).weight
        x = torch.randn(1, 4 * self.num_experts, self.hidden, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self._route(lambda: self.block(x.to(w.device, w.dtype)))


def rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """Positions p with ``x[p]`` equal to ``rows`` bit for bit (None if some row is not one of x's). Equal rows of x
    (the first token of sequences that start alike) are taken in ascending order. Rows are matched by an integer
    hash of their bits, then compared in full."""
    kx, kr = _row_keys(x), _row_keys(rows)
    order = torch.argsort(kx, stable=True)
    sx = kx[order]
    lo, hi = torch.searchsorted(sx, kr, side="left"), torch.searchsorted(sx, kr, side="right")
    by_key = torch.argsort(kr, stable=True)  # each row's rank among the rows of the same key
    sk = kr[by_key]
    rank = torch.empty_like(by_key)
    rank[by_key] = torch.arange(len(kr), device=kr.device) - torch.searchsorted(sk, sk, side="left")
    if len(kr) and bool((lo + rank >= hi).any()):
        return None
    pos = order[lo + rank]
    return pos if torch.equal(x[pos], rows) else None


def _row_keys(x: torch.Tensor) -> torch.Tensor:
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()]
    w = torch.randint(1, 2**31, (x.shape[-1],), generator=torch.Generator().manual_seed(1)).to(x.device)
    return (x.contiguous().view(bits).to(torch.int64) * w).sum(-1)  # wraps on overflow: a hint, checked after


def _is_fused(module: nn.Module) -> bool:
    p = dict(module.named_parameters(recurse=False))
    return any(t.dim() == 3 and t.is_floating_point() for t in p.values()) and "down_proj" in p


def find_experts(layer: nn.Module, keep_float=(), prefix: str = "") -> dict[str, FusedExperts | ExpertList]:
    """The layer's experts that are quantized (not named by ``keep_float``), by name within the layer; an unsupported
    variant raises ``UnsupportedExpertsError`` naming it."""
    found = {}
    for name, m in layer.named_modules():
        if matches(prefix + name, keep_float):
            continue
        if _is_fused(m):
            why = _unsupported(m)
            if why:
                raise _refused(prefix + name, m, why)
            found[name] = FusedExperts(name, m)
        elif _is_expert_list(layer, name, m):
            found[name] = _expert_list(layer, prefix, name, m)
        else:
            continue
        part = [n for n in found[name].slices() if matches(prefix + n, keep_float)]
        if part:
            raise UnsupportedExpertsError(
                f"keep_float {list(keep_float)} names {len(part)} of the {len(found[name].slices())} expert "
                f"matrices of {prefix}{name} (e.g. {prefix}{part[0]}): experts are quantized or kept in float as a "
                f"whole; name the module ({prefix}{name}) to keep it, or a pattern outside it")
    return found


def _refused(full: str, m: nn.Module, why: str) -> UnsupportedExpertsError:
    last = full.rpartition(".")[2]
    return UnsupportedExpertsError(
        f"{full} ({type(m).__name__}): {why}; these experts cannot be quantized yet: pass keep_float=({last!r},) "
        f"(CLI: --keep-float {last}) to keep them in float knowingly")


def _is_expert_list(layer: nn.Module, name: str, m: nn.Module) -> bool:
    """An ``experts`` ModuleList of two or more modules of one class that hold Linears."""
    return (isinstance(m, nn.ModuleList) and name.rpartition(".")[2] == "experts" and len(m) > 1
            and len({type(c) for c in m}) == 1 and any(isinstance(x, nn.Linear) for x in m[0].modules()))


def _expert_list(layer: nn.Module, prefix: str, name: str, m: nn.ModuleList) -> ExpertList:
    """The list's roles from a forward of its first expert on a probe: the Linears that get the expert's input itself,
    and the one Linear that gets something else."""
    parent = name.rpartition(".")[0]
    block = layer.get_submodule(parent) if parent else layer
    expert = m[0]
    lins = {n: x for n, x in expert.named_modules() if isinstance(x, nn.Linear)}
    w = next(iter(lins.values())).weight
    x = torch.randn(3, next(iter(lins.values())).in_features, generator=torch.Generator().manual_seed(0))
    x = x.to("meta" if w.is_meta else w.device, w.dtype)
    seen: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args[0]))
             for n, lin in lins.items()]
    try:
        with torch.no_grad():
            expert(x)
    except Exception as err:
        raise _refused(prefix + name, m, f"its experts cannot be called with tokens alone ({err})") from err
    finally:
        for h in hooks:
            h.remove()
    first = tuple(n for n in lins if n in seen and seen[n] is x)
    rest = [n for n in lins if n not in first]
    if not first or len(rest) != 1 or rest[0] not in seen:
        raise _refused(prefix + name, m, f"each expert's Linears {sorted(lins)} are not Linears fed the expert's "
                                         "tokens as they are and one Linear fed their result")
    return ExpertList(name, m, block, first, rest[0])


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


__all__ = ["PROJECTIONS", "ExpertList", "ExpertSlice", "FusedExperts", "UnsupportedExpertsError", "check_forward",
           "find_experts", "fused_module_of", "make_room", "rows_of"]
