"""The processes that run one pipeline, and the few collectives they need.

A world is this process alone (rank 0 of 1) or the ranks of torch.distributed's default process group, as
``torchrun`` starts them (gloo on CPUs, NCCL on GPUs). Every rank enters every collective here in the same order:
what each rank does is derived from metadata every rank holds (shards.py, schedule.py), never from what another
rank happened to do. On one rank no collective runs at all. Per layer group: an all_reduce of the Hessian sums
(float64) and of their entries' exponent ranges (ShardSums), a gather of the few entries that need the shard order,
and one broadcast of solved modules per rank that solved any (share).
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch


class World:
    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.size = self.dist.get_world_size() if self.dist else 1
        nccl = self.dist is not None and self.dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    # -- objects -----------------------------------------------------------------------------------------------
    def broadcast_object(self, obj, src: int = 0):
        if self.size == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj, dst: int = 0) -> list | None:
        """Every rank's ``obj`` on ``dst`` (in rank order), None elsewhere."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == dst else None
        self.dist.gather_object(obj, out, dst=dst)
        return out

    def on_rank0(self, fn):
        """``fn()`` run on rank 0 only (e.g. a check of the output folder only rank 0 writes); its exception, if any,
        raised on every rank, so that no rank goes on to wait for one that stopped."""
        error = None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as exc:  # sent to the other ranks, then raised here as it was
                error = exc
        else:
            result = None
        sent = self.broadcast_object(None if error is None else (type(error), str(error)))
        if error is not None:
            raise error
        if sent is not None:
            kind, message = sent
            try:
                error = kind(message) if isinstance(kind, type) and issubclass(kind, Exception) else None
            except Exception:  # an exception type that takes other arguments
                error = None
            raise error or RuntimeError(f"rank 0: {message}")
        return result

    def same_everywhere(self, digest: str, what: str) -> None:
        """Raise on every rank unless every rank holds the same ``digest`` (of its arguments): ranks given different
        arguments would enter different collectives and wait on each other until the timeout."""
        if self.size == 1:
            return
        every = [None] * self.size
        self.dist.all_gather_object(every, digest)
        other = [r for r, d in enumerate(every) if d != every[0]]
        if other:
            raise ValueError(f"ranks {other} were given other {what} than rank 0: every rank must call with the same "
                             "arguments")

    def barrier(self) -> None:
        if self.size > 1:
            self.dist.barrier()

    # -- tensors -----------------------------------------------------------------------------------------------
    def sum_int(self, values: list[int]) -> list[int]:
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def share(self, owner: dict[str, int], local: dict[str, dict[str, torch.Tensor]], layout: dict) -> dict:
        """Each module's record (named tensors) from the rank that made it to every rank: one broadcast of a flat
        bucket per rank that owns any. ``layout[name]``: ((key, shape, dtype), ...), known to every rank."""
        if self.size == 1:
            return dict(local)
        out = {}
        for src in range(self.size):
            names = sorted(n for n, r in owner.items() if r == src)
            if not names:
                continue
            sizes = [(n, key, shape, dtype, _nbytes(shape, dtype)) for n in names for key, shape, dtype in layout[n]]
            buf = torch.empty(sum(s[-1] for s in sizes), dtype=torch.uint8, device=self.device)
            at = 0
            if src == self.rank:
                for n, key, _, _, nb in sizes:
                    buf[at:at + nb].copy_(local[n][key].contiguous().reshape(-1).view(torch.uint8))
                    at += nb
                at = 0
            self.dist.broadcast(buf, src=src)
            buf = buf.cpu()
            for n, key, shape, dtype, nb in sizes:
                out.setdefault(n, {})[key] = buf[at:at + nb].view(dtype).reshape(shape).clone()
                at += nb
        return out


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class ShardSums:
    """Σ over the virtual shards of each shard's fp32 sums, in float64, bit for bit the same whatever the world size:
    the sum in shard order. One rank folds each shard in as it finishes (its shards come in order). Several ranks
    use that fp32 values whose exponents span at most ``_exact_span(S)`` binary orders have every partial sum exact
    in float64, so any order gives the shard-order bits: one float64 all_reduce serves those entries (with one of
    each entry's exponent range, 2 bytes per entry), and only the entries whose shards' values span more are
    gathered and added in shard order."""

    def __init__(self, world: World, owner: list[int]) -> None:
        self.world, self.owner = world, owner
        self.mine: dict[int, list[torch.Tensor]] = {}
        self.folded: list[torch.Tensor] | None = None
        self.counts: list[int] | None = None  # summed over this rank's shards: (sequences, tokens), or any ints
        self.wide = 0  # entries that took the ordered path (several ranks)

    def add(self, shard: int, sums: list[torch.Tensor], counts: tuple[int, int]) -> None:
        self.counts = list(counts) if self.counts is None else [a + b for a, b in zip(self.counts, counts, strict=True)]
        if self.world.size > 1:
            self.mine[shard] = sums
            return
        if self.folded is None:
            self.folded = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in sums]
        for acc, t in zip(self.folded, sums, strict=True):
            acc += t

    def total(self, shapes: list[tuple[int, ...]], device, n_counts: int = 2) -> tuple[list[torch.Tensor], list[int]]:
        """The float64 totals (on ``device``) and the summed counts (``n_counts`` of them)."""
        counts = self.world.sum_int(self.counts if self.counts is not None else [0] * n_counts)
        if self.world.size == 1:
            if self.folded is None:
                return [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes], counts
            return self.folded, counts
        return [self._total(k, shape, device) for k, shape in enumerate(shapes)], counts

    def _total(self, k: int, shape, device) -> torch.Tensor:
        w, comm = self.world, self.world.device
        local = [self.mine[s][k].to(comm) for s in sorted(self.mine)]
        total = torch.zeros(shape, dtype=torch.float64, device=comm)
        # each entry's largest and smallest nonzero |value| over this rank's shards, compared as the int32 patterns
        # of fp32 magnitudes (their order is the floats' order); in place in three buffers, one pass each
        top = torch.zeros(shape, dtype=torch.int32, device=comm)
        low = torch.full(shape, _INT32_MAX, dtype=torch.int32, device=comm)
        bits = torch.empty(shape, dtype=torch.int32, device=comm)
        for t in local:
            total += t  # exact wherever the span is narrow: the order is free there
            torch.bitwise_and(t.contiguous().view(torch.int32), _INT32_MAX, out=bits)  # |t|
            torch.maximum(top, bits, out=top)
            bits.sub_(1).bitwise_and_(_INT32_MAX)  # a zero becomes the largest pattern: the smallest nonzero wins
            torch.minimum(low, bits, out=low)
        del bits
        none = low == _INT32_MAX  # zero in every shard of this rank: no say in the smallest exponent
        low.masked_fill_(none, -1).add_(1)
        span = torch.stack([_exponent(top), torch.where(none, 0, 255 - _exponent(low))])
        del top, low, none
        w.dist.all_reduce(span, op=w.dist.ReduceOp.MAX)  # [max exponent, 255 - min exponent] over every shard
        w.dist.all_reduce(total)
        wide = ((span[0].int() + span[1].int() - 255) > _exact_span(len(self.owner))) & (span[0] > 0)
        wide = wide.flatten().nonzero().flatten()
        del span
        if wide.numel():  # (the same entries on every rank)
            self.wide += wide.numel()
            slots = max(self.owner.count(r) for r in range(w.size))
            vals = torch.zeros(slots, wide.numel(), dtype=torch.float32, device=comm)
            for j, t in enumerate(local):
                vals[j] = t.flatten()[wide]
            parts = [torch.empty_like(vals) for _ in range(w.size)]
            w.dist.all_gather(parts, vals)
            ordered = torch.zeros(wide.numel(), dtype=torch.float64, device=comm)
            seen = [0] * w.size
            for s in range(len(self.owner)):  # shard order, whichever rank ran it
                r = self.owner[s]
                ordered += parts[r][seen[r]]
                seen[r] += 1
            total.view(-1)[wide] = ordered
        return total.to(device)


_INT32_MAX = 0x7FFFFFFF


def _exponent(magnitude_bits: torch.Tensor) -> torch.Tensor:
    """The biased fp32 exponent (uint8) of magnitudes given as int32 bit patterns: 0 for zero, 1 for a subnormal
    (the exponent its last bit shares with the smallest normals)."""
    e = (magnitude_bits >> 23).to(torch.uint8)
    return torch.where((e == 0) & (magnitude_bits != 0), 1, e).to(torch.uint8)


def _exact_span(n_shards: int) -> int:
    """The widest exponent span (binary orders) of n fp32 values whose every partial sum is exact in float64: the
    values are multiples of the smallest one's last bit, 2^(e_min − 23), and below n·2^(e_max + 1) in magnitude,
    so they count at most n·2^(span + 24) last bits, which fit float64's 53 bits when span ≤ 29 − log2 n (one
    order of margin kept)."""
    return 28 - math.ceil(math.log2(max(n_shards, 1)))


def init_from_env(device: str | None, timeout_s: float) -> bool:
    """Join the process group ``torchrun`` describes in the environment (WORLD_SIZE > 1): NCCL when the layers run
    on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise; a collective waits at most ``timeout_s`` for a rank
    that stopped. Returns whether a group was started here (the caller ends it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


__all__ = ["ShardSums", "World", "init_from_env"]
