"""Run by test_distributed.py, alone or under torchrun: ShardSums over fixed shards (some entries crafted so that
the float64 sum depends on the order) on this world; rank 0 saves the totals."""

from __future__ import annotations

import sys

import torch

from maca_kernels.pipeline.world import ShardSums, World

OWNER = [0, 1, 1, 0, 1, 0]  # shard -> rank with two ranks (one rank runs them all)


def shard_sums(s: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(s)
    h = torch.randn(9, 9, generator=g) * 2.0 ** torch.randint(-3, 4, (9, 9), generator=g)
    h[0, 0] = (2.0**30, 2.0**-30, -(2.0**30), 2.0**-30, 1.0, 0.0)[s]  # the order decides: 1 + 2^-30 or 1 + 2^-29
    h[1, 2] = 0.0 if s % 2 else 2.0**-149 * (s + 1)  # zeros and subnormals
    h[3, 4] = 3.0 * 2.0 ** (s * 7 - 20)  # spans widen with the shard index
    h[5, 5] = 1.5 if OWNER[s] == 0 else 0.0  # zero on every shard of rank 1: narrow all the same
    return [h, -2 * h.T.contiguous()]


def main() -> None:
    world_size = int(sys.argv[2])
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
    world = World()
    sums = ShardSums(world, OWNER if world_size > 1 else [0] * len(OWNER))
    for s in range(len(OWNER)):
        if sums.owner[s] == world.rank:
            sums.add(s, shard_sums(s), (1, 10))
    totals, counts = sums.total([(9, 9), (9, 9)], "cpu")
    if world.rank == 0:
        torch.save({"totals": totals, "counts": counts, "wide": sums.wide}, sys.argv[1])
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
