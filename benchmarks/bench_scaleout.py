"""The pipeline on several processes: quantize_folder of a random Llama (hidden 2048, intermediate 8192, bf16 on
disk, float32 in memory) with 2, 4 and 8 decoder layers, one process with 2 threads against two ranks of one
thread each under torchrun (gloo), on the CPU. The figures: wall time of each, the time split per rank (load,
forward, Hessian, waiting for the other rank, the collectives themselves, solve, write) and each
process's peak RSS. Both write the same checkpoint only at equal threads per process (MKL's sums follow the
thread count), so this compares speed, not bits.

    python -m benchmarks.bench_scaleout [--layers 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import environment, print_table, write_results

COLUMNS = ["layers", "ranks", "threads", "wall_s", "rank", "load_s", "forward_s", "hessian_s", "wait_s", "reduce_s",
           "ordered", "solve_s", "write_s", "peak_mb"]
WORKER = os.path.join(os.path.dirname(__file__), "pipeline_worker.py")


def _model(folder: str, layers: int) -> None:
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=4,
                            num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def _launch(src: str, out: str, ranks: int, threads: int) -> tuple[float, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, WORKER, src, out] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", WORKER, src, out]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    rows = [json.loads(line.split("ROW ", 1)[1]) for line in p.stdout.splitlines() if "ROW " in line]
    return wall, sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in a.layers:
            src = os.path.join(tmp, f"llama{layers}")
            _model(src, layers)
            for ranks, threads in ((1, 2), (2, 1)):
                out = os.path.join(tmp, f"out{layers}_{ranks}")
                wall, per_rank = _launch(src, out, ranks, threads)
                for r in per_rank:
                    parts = {k: r[k] for k in COLUMNS if k in r and k not in ("layers", "ranks", "threads", "wall_s")}
                    rows.append(dict(layers=layers, ranks=ranks, threads=threads, wall_s=wall, **parts))
                print(f"{layers} layers, {ranks} x {threads} threads: {wall:.1f} s", flush=True)
    print_table(rows, COLUMNS)
    for layers in a.layers:
        w = {rk: next(r["wall_s"] for r in rows if r["layers"] == layers and r["ranks"] == rk) for rk in (1, 2)}
        print(f"{layers} layers: 2 ranks x 1 thread / 1 rank x 2 threads = {w[2] / w[1]:.2f}")
    print("wall_s: the whole launch (process start to exit, torchrun's rendezvous included); the parts: each rank's")
    print("wrote", write_results("scaleout", environment(), rows))


if __name__ == "__main__":
    main()
