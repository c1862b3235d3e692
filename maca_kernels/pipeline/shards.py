"""The calibration set cut into virtual shards: the unit of data parallelism.

The bits of a run depend on the shards, never on how many processes run them. Every sequence belongs to one
shard for good (assigned by cost, longest first); a shard's micro-batches are formed inside it, so a sequence's
activations never depend on which rank runs it; each shard's Hessian sums are its own, and the shards' sums are
added in shard order in float64 (world.py). Ranks own whole shards, balanced by cost the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sequence_cost(length: int) -> int:
    """A decoder layer's work on one sequence: the linear modules cost ∝ L, attention ∝ L² (per token about L / 6d of
    the linear work; 4096 stands for 6d at the sizes calibrated), so a 2048-token sequence counts 1.5× its tokens."""
    return length * (4096 + length)


def balance(costs: list[int], bins: int) -> list[int]:
    """Longest processing time first: items by cost (descending, ties by index), each to the least loaded bin (ties:
    the lowest). Item i's bin."""
    load = [0] * bins
    where = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(bins), key=lambda b: (load[b], b))
        where[i] = b
        load[b] += costs[i]
    return where


@dataclass(frozen=True)
class Shards:
    batches: list[list[torch.Tensor]]  # shard -> its micro-batches of token ids [n, L] (one length each)
    owner: list[int]  # shard -> the rank that runs it

    def of(self, rank: int) -> list[int]:
        """The shards ``rank`` runs, in shard order."""
        return [s for s, r in enumerate(self.owner) if r == rank]


def make_shards(groups: list[torch.Tensor], n_shards: int, max_tokens: int, world_size: int) -> Shards:
    """``groups``: token ids [n, L] of each length, by increasing L. At most ``n_shards`` shards (one per sequence
    when there are fewer); inside a shard the sequences of one length, in calibration order, are split into batches of
    at most ``max_tokens`` tokens (one sequence at least). One shard gives the batches the whole set would get."""
    seqs = [(g, row) for g, ids in enumerate(groups) for row in range(ids.shape[0])]
    n = min(n_shards, len(seqs))
    where = balance([sequence_cost(groups[g].shape[1]) for g, _ in seqs], n) if n else []
    batches: list[list[torch.Tensor]] = [[] for _ in range(n)]
    cost = [0] * n
    for s in range(n):
        for g, ids in enumerate(groups):
            rows = [row for (gi, row), w in zip(seqs, where, strict=True) if gi == g and w == s]
            if rows:
                length = ids.shape[1]
                batches[s] += list(ids[rows].split(max(1, max_tokens // length)))
                cost[s] += len(rows) * sequence_cost(length)
    return Shards(batches, balance(cost, world_size))


__all__ = ["Shards", "balance", "make_shards", "sequence_cost"]
