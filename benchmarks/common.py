"""Timing, environment capture and result files shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

OUT_DIR = os.path.join(os.path.dirname(__file__), "out")
# do_bench windows (ms of measured runs). benchmarks/gpu_check.py shortens them to fit a GPU session.
GPU_WARMUP_MS = 25
GPU_REP_MS = 200


def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(0)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["sms"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["driver"] = _nvidia_driver()
    else:
        info["device"] = "cpu"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def time_cpu(fn: Callable[[], object], warmup: int = 1, reps: int = 5) -> float:
    """Median wall time in ms over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cpu_paired(fns: dict[str, Callable[[], object]], warmup: int = 2, rounds: int = 15, inner: int = 5
                    ) -> dict[str, float]:
    """Median ms per call of each function, timed in interleaved rounds (each round runs every function
    ``inner`` times), so load from other jobs on a shared machine hits all of them alike: for ratios."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_gpu(fn: Callable[[], object]) -> float:
    """Median ms with warm-up and the L2 cache flushed before every run (triton's do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, quantiles=[0.5, 0.2, 0.8])[0]


def write_results(name: str, env: dict, rows: list[dict], out_dir: str = OUT_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    device = env["device"].replace(" ", "_").replace("/", "_")
    stamp = env["date"][:10]
    path = os.path.join(out_dir, f"{name}-{device}-{stamp}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"benchmark": name, "environment": env, "rows": rows}, f, indent=1)
    os.replace(tmp, path)  # never leave a half-written result
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def run_benchmark(name: str, doc: str, bench_cpu, bench_gpu, columns: list[str], legend: str) -> None:
    """Shared command line: ``[--cpu] [--gpu]``, then the table, the legend and the JSON file."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="only the CPU benchmark")
    p.add_argument("--gpu", action="store_true", help="only the GPU benchmark")
    args, _ = p.parse_known_args()
    env = environment()
    rows = []
    if not args.gpu:
        rows += bench_cpu()
    if not args.cpu:
        if torch.cuda.is_available():
            rows += bench_gpu()
        else:
            print("no CUDA device: GPU benchmark skipped (no GPU figure is written without one)")
    print_table(rows, columns)
    print(legend)
    print("wrote", write_results(name, env, rows))
