"""What the distributed tests launch, under torchrun or alone: quantize_folder (or quantize_model + save_quantized on
rank 0) of a tiny model folder with a MaCa-like calibration of uneven lengths."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from tiny_models import ListMoeBlock, random_sequences  # noqa: E402

import maca_kernels as mk  # noqa: E402

# 9 sequences: one of 48 and one of 80 tokens (more ranks than sequences of those lengths), 9 not divisible by 2 or 4
LENGTHS = [16, 16, 16, 32, 32, 48, 64, 64, 80]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--method", default="gptq")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--resume", default=None)
    p.add_argument("--in-memory", action="store_true")
    p.add_argument("--list-experts", action="store_true", help="(in memory) the MoE blocks' experts as a ModuleList")
    p.add_argument("--die-after-layer", type=int, default=None, help="rank 1 exits at its first solve past this layer")
    p.add_argument("--rank1-method", default=None, help="rank 1 is given another method (a user's mistake)")
    a = p.parse_args()
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from datetime import timedelta

        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
        started = True
    rank = int(os.environ.get("RANK", "0"))
    if rank == 1 and a.rank1_method:
        a.method = a.rank1_method

    def callback(name, H, result):
        if a.die_after_layer is not None and rank == 1 and int(name.split(".")[2]) > a.die_after_layer:
            os._exit(3)

    kw = dict(method=a.method, act_order=a.act_order, calib_shards=a.shards, resume_dir=a.resume, progress=False,
              log=None, callback=callback)
    calib = None if a.method == "rtn" else random_sequences(LENGTHS, seed=4)
    if a.in_memory:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.float32)
        if a.list_experts:
            for layer in model.model.layers:
                layer.mlp = ListMoeBlock(layer.mlp)
        model = mk.quantize_model(model, calib, 4, 32, **kw)
        if rank == 0:
            mk.save_quantized(model, a.out, max_shard_size="40KB")
    else:
        mk.quantize_folder(a.src, a.out, calib, 4, 32, dtype=torch.float32, max_shard_size="40KB", **kw)
    stats = mk.quantize_folder.last_stats if not a.in_memory else model.quantize_stats
    print(f"rank {rank}: solved {stats.solve_s:.3f} s, reduce {stats.reduce_s:.3f} s", flush=True)
    if started:  # every rank stays until rank 0 has written: no connection torn down while a peer still works
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
