"""One process of the scale-out benchmark (bench_scaleout.py): quantize_folder on a model folder with a fixed random
MaCa-like calibration, alone or as one rank under torchrun; prints one JSON line with its time split and peak RSS."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import maca_kernels as mk

# 16 sequences, 4096 tokens: 8 × 128, 4 × 256, 2 × 512, 1 × 1024 (MaCa-like: many short, few long)
LENGTHS = [128] * 8 + [256] * 4 + [512] * 2 + [1024]


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 32000, (n,), generator=g) for n in LENGTHS]
    t0 = time.perf_counter()
    mk.quantize_folder(src, out, calib, 4, 128, dtype=torch.float32, progress=False, log=None)
    wall = time.perf_counter() - t0
    s = mk.quantize_folder.last_stats
    row = dict(rank=int(os.environ.get("RANK", "0")), world=s.world_size, threads=torch.get_num_threads(),
               wall_s=wall, load_s=s.load_s, forward_s=s.forward_s, hessian_s=s.hessian_s, wait_s=s.wait_s,
               reduce_s=s.reduce_s, ordered=s.ordered_entries, solve_s=s.solve_s, pack_s=s.pack_s, write_s=s.write_s,
               peak_mb=s.peak_memory_mb)  # this process's own VmHWM (not ru_maxrss: that holds its parent's too)
    print("ROW " + json.dumps(row), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
