"""The processes that run one pipeline, and the few collectives they need.

A world is this process alone (rank 0 of 1) or the ranks of torch.distributed's default process group, as
``torchrun`` starts them (gloo on CPUs, NCCL on GPUs). Every rank enters every collective here in the same order:
what each rank does is derived from metadata every rank holds (shards.py, schedule.py), never from what another
rank happened to do. On one rank no collective runs at all.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

_BUCKET_BYTES = 256 << 20  # the most one all_gather of Hessian rows holds on each rank


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
            raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(message)
        return result

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

    def gather_rows(self, local: list[torch.Tensor], slots: int, r0: int, r1: int, d: int) -> list[torch.Tensor]:
        """Rows r0:r1 of every rank's ``local`` fp32 tensors ([rows, d] each, padded to ``slots`` per rank): one
        all_gather; entry [rank * slots + slot] of the result."""
        buf = torch.zeros(slots, r1 - r0, d, dtype=torch.float32, device=self.device)
        for j, t in enumerate(local):
            buf[j].copy_(t[r0:r1])
        out = [torch.empty_like(buf) for _ in range(self.size)]
        self.dist.all_gather(out, buf)
        return [row for part in out for row in part]

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
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class ShardSums:
    """Σ over the virtual shards of each shard's sums, added in shard order in float64 whatever the world size.
    One rank folds each shard in as it finishes (its shards come in order); several ranks keep their shards' fp32
    sums and ``total`` gathers them a block of rows at a time (at most ``_BUCKET_BYTES`` per rank per collective)."""

    def __init__(self, world: World, owner: list[int]) -> None:
        self.world, self.owner = world, owner
        self.mine: dict[int, list[torch.Tensor]] = {}
        self.folded: list[torch.Tensor] | None = None
        self.counts = [0, 0]

    def add(self, shard: int, sums: list[torch.Tensor], counts: tuple[int, int]) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        if self.world.size > 1:
            self.mine[shard] = sums
            return
        if self.folded is None:
            self.folded = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in sums]
        for acc, t in zip(self.folded, sums, strict=True):
            acc += t

    def total(self, shapes: list[tuple[int, int]], device) -> tuple[list[torch.Tensor], list[int]]:
        """The float64 totals (on ``device``) and the summed counts."""
        counts = self.world.sum_int(self.counts)
        if self.world.size == 1:
            if self.folded is None:
                return [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes], counts
            return self.folded, counts
        w = self.world
        slots = max(1, max(self.owner.count(r) for r in range(w.size)))
        slot = {s: sorted(x for x in range(len(self.owner)) if self.owner[x] == r).index(s)
                for r in range(w.size) for s in range(len(self.owner)) if self.owner[s] == r}
        totals = []
        for k, (rows, d) in enumerate(shapes):
            local = [self.mine[s][k] for s in sorted(self.mine)]
            total = torch.zeros(rows, d, dtype=torch.float64, device=device)
            step = max(1, _BUCKET_BYTES // (w.size * slots * d * 4))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                parts = w.gather_rows(local, slots, r0, r1, d)
                for s in range(len(self.owner)):  # shard order, whichever rank ran it
                    total[r0:r1] += parts[self.owner[s] * slots + slot[s]].to(device)
            totals.append(total)
        return totals, counts


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
