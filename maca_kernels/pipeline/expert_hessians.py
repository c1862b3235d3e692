"""The Hessians of an MoE layer's experts, fused or a list (``experts.py``; ``quantize_model``'s docstring has the
formulas and the policy).

The tokens reaching the module are captured once per layer (with their routing), then the experts are taken in
chunks whose Hessians fit a fixed budget: a chunk's sums are accumulated from the captured tokens, added over the
shards in shard order in float64 like any Hessian (world.ShardSums), normalised, solved and freed before the next.
A layer of 128 experts of hidden 2048 would otherwise hold 128 Hessians of 16 MB in three precisions at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops.hessian.accumulator import HessianAccumulator
from .activations import keep
from .experts import ExpertList, FusedExperts
from .world import ShardSums

Experts = FusedExperts | ExpertList

CHUNK_BYTES = 1 << 30  # what one chunk's Hessians may take (fp32 sums, float64 totals, fp32 means)


@dataclass
class Routed:
    """One micro-batch at the experts: its tokens [n·L, d] (sequence-major), GPTAQ's full-precision ones, and the
    experts each token is routed to [n·L, k] (E pads a token that reached fewer)."""

    x: torch.Tensor
    x_fp: torch.Tensor | None
    idx: torch.Tensor
    n: int
    L: int


@dataclass
class ExpertCounts:
    tokens: list[int]  # routed to each expert, over the whole calibration set
    sequences: list[int]  # sequences with at least one token routed to each expert

    def policy(self, moe_calibration: str, min_tokens: int) -> list[str]:
        if moe_calibration == "all":
            return ["all tokens"] * len(self.tokens)
        return ["all tokens" if n == 0 else ("routed" if n >= min_tokens else "blended") for n in self.tokens]


def capture(job, ex: Experts, fp_ex: Experts | None, calls, q) -> dict[int, list[Routed]]:
    """This rank's micro-batches at the experts (kept where the calibration streams wait), from ``calls``: (shard,
    batch, the call of ``ex.entry``, that of ``fp_ex.entry``) for each micro-batch of ``q``."""
    out: dict[int, list[Routed]] = {s: [] for s in job.mine}
    for s, bi, call, fp_call in calls:
        t0 = time.perf_counter()
        x, idx = ex.routed(call)
        x_fp = fp_ex.tokens(fp_call) if fp_ex is not None else None
        job.stats.forward_s += time.perf_counter() - t0
        n, L = q[s][bi].hidden.shape[:2]
        out[s].append(Routed(keep(x, job.store), None if x_fp is None else keep(x_fp, job.store), idx, n, L))
    return out


def count(job, ex: Experts, routed: dict[int, list[Routed]]) -> ExpertCounts:
    """Tokens and sequences routed to each expert, over every rank's shards."""
    E = ex.num_experts
    tokens, seqs = torch.zeros(E, dtype=torch.int64), torch.zeros(E, dtype=torch.int64)
    for batches in routed.values():
        for r in batches:
            hit = torch.zeros(r.n * r.L, E + 1, dtype=torch.bool, device=r.idx.device)
            hit = hit.scatter_(1, r.idx.long(), True)[:, :E]
            tokens += hit.sum(0).cpu()
            seqs += hit.view(r.n, r.L, E).any(1).sum(0).cpu()
    c = job.world.sum_int(tokens.tolist() + seqs.tolist())
    return ExpertCounts(tokens=c[:E], sequences=c[E:])


def chunks(ex: Experts, gptaq: bool) -> list[list[int]]:
    per_expert = 16 * max(ex.hidden, ex.intermediate) ** 2 * (2 if gptaq else 1)
    size = max(1, CHUNK_BYTES // per_expert)
    return [list(range(i, min(i + size, ex.num_experts))) for i in range(0, ex.num_experts, size)]


def _tokens_of(r: Routed, e: int) -> tuple[torch.Tensor, list[int]] | None:
    """The positions of the tokens routed to expert e (ascending, so grouped by sequence) and their count per
    sequence that has any."""
    tok = (r.idx == e).any(-1).nonzero().flatten()
    if tok.numel() == 0:
        return None
    per_seq = torch.bincount(tok // r.L, minlength=r.n)
    return tok, per_seq[per_seq > 0].tolist()


def _sums(job, routed, keys: list, inputs: Callable, gptaq: bool, d: int):
    """For each key, Σ over the calibration set of the weighted XᵀX (and ΔXᵀX) of what ``inputs(key, r, x, x_fp)``
    gives for micro-batch r ((x, x_fp, lengths) or None), and its counts: {key: ([sums], (sequences, tokens))}."""
    sums = ShardSums(job.world, job.shards.owner)
    t_h = t_add = 0.0
    for s in job.mine:
        accs = {k: HessianAccumulator(d, weighting=job.opts["weighting"], cross_term=gptaq, device=job.device)
                for k in keys}
        for r in routed[s]:
            x = r.x.to(job.device, non_blocking=True)
            x_fp = None if r.x_fp is None else r.x_fp.to(job.device, non_blocking=True)
            t0 = time.perf_counter()
            for k in keys:
                got = inputs(k, r, x, x_fp)
                if got is not None:
                    accs[k].add(got[0], got[2], x_fp=got[1])
            t_h += time.perf_counter() - t0
        t0 = time.perf_counter()
        sums.add(s, [t for k in keys for t in accs[k].sums()],
                 [c for k in keys for c in (accs[k].n_sequences, accs[k].n_tokens)])
        t_add += time.perf_counter() - t0
        del accs
    job.stats.hessian_s += t_h
    job.stats.reduce_s += t_add  # one process: each shard's sums folded into the float64 totals in shard order
    per = 2 if gptaq else 1
    t0 = time.perf_counter()
    totals, c = sums.total([(d, d)] * (per * len(keys)), job.device, n_counts=2 * len(keys))
    job.stats.reduce_s += time.perf_counter() - t0
    job.stats.ordered_entries += sums.wide
    job.stats.held("hessian", totals)
    return {k: (totals[i * per:(i + 1) * per], (c[2 * i], c[2 * i + 1])) for i, k in enumerate(keys)}


def _mean(parts, counts, weighting: str) -> list[torch.Tensor]:
    n = counts[0] if weighting == "sequence" else counts[1]
    return [t * (2.0 / n) if n else torch.zeros_like(t) for t in parts]


def block_hessian(job, routed, gptaq: bool, d: int) -> list[torch.Tensor]:
    """Every token's Hessian (and cross term) of the experts' input, as a dense module's: float64 means."""
    got = _sums(job, routed, ["all"], lambda k, r, x, x_fp: (x, x_fp, [r.L] * r.n), gptaq, d)["all"]
    return _mean(*got, job.opts["weighting"])


def chunk_hessians(job, ex: Experts, fp_ex, routed, chunk: list[int], counts: ExpertCounts, policy: list[str],
                   down: bool, block: list[torch.Tensor] | None) -> dict[int, tuple]:
    """The experts of ``chunk``: {expert: (H, dxxt)} in fp32 for their gate/up (``down=False``; ``block``: the
    every-token Hessian from ``block_hessian``) or their down projection (the expert's own act(gate)·up)."""
    o, gptaq = job.opts, fp_ex is not None
    d = ex.intermediate if down else ex.hidden

    def inputs(key, r, x, x_fp):
        kind, e = key
        if kind == "routed":
            got = _tokens_of(r, e)
            if got is None:
                return None
            tok, lengths = got
            xe, xfe = x[tok], (x_fp[tok] if gptaq else None)
        else:  # every token through expert e
            xe, xfe, lengths = x, x_fp, [r.L] * r.n
        if down:
            xe, xfe = ex.inner(e, xe), (fp_ex.inner(e, xfe) if gptaq else None)
        return xe, xfe, lengths

    keys = [("routed", e) for e in chunk]
    keys += [("all", e) for e in chunk if down and policy[e] != "routed"]
    got = _sums(job, routed, keys, inputs, gptaq, d)
    out = {}
    for e in chunk:
        mine = _mean(*got[("routed", e)], o["weighting"])
        if policy[e] == "routed":
            parts = mine
        else:
            alls = _mean(*got[("all", e)], o["weighting"]) if down else block
            w = counts.tokens[e] / o["moe_min_tokens"] if policy[e] == "blended" else 0.0
            parts = [w * m + (1 - w) * a for m, a in zip(mine, alls, strict=True)]
        out[e] = (parts[0].to(torch.float32), parts[1].to(torch.float32) if gptaq else None)
    return out


__all__ = ["CHUNK_BYTES", "ExpertCounts", "Routed", "block_hessian", "capture", "chunk_hessians", "chunks", "count"]
