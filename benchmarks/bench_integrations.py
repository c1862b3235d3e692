"""Whole-model GPTQ through GPTQModel and llm-compressor, the tool's own path vs the maca_kernels backend, on
the embedded SmolLM2-135M (CPU), with the time split: Hessian accumulation (in the tool's forward hooks),
solve, and the rest (forward passes, observers, packing, bookkeeping). Each tool runs in its own venv
(``make interop`` builds them); the model and text must already be installed (``make demo`` does it).

    PYTHONPATH=. .venv-interop/bin/python -m benchmarks.bench_integrations --tool gptqmodel
    PYTHONPATH=. .venv-llmc/bin/python -m benchmarks.bench_integrations --tool llmcompressor

4-bit, group 64 (SmolLM2's hidden size 576 is not a multiple of 128), 16 Jargon File windows of 256 tokens,
token weighting for the default-vs-backend comparison plus one MaCa run (sequence weighting). Writes
``benchmarks/results/integrations-<tool>-cpu.{json,md}``. GPTQModel solves modules on 2 worker threads:
its solve column is summed over threads, so "rest" is wall − Hessian − solve, an approximation there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class Timers:
    """Seconds spent inside wrapped callables, summed over calls and threads."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def wrap(self, owner, name: str, bucket: str):
        fn = getattr(owner, name)
        timers = self

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with timers._lock:
                    timers.s[bucket] = timers.s.get(bucket, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, fn)


def calibration_records(tok, n: int, seq_len: int) -> list[dict]:
    from maca_kernels import calibration, embedded

    ids, _ = calibration.holdout_split(calibration.load_token_ids(text=embedded.jargon_text(), tokenizer=tok))
    return calibration.fixed(ids, seq_len, total_tokens=n * seq_len, seed=0).to_records()


def run_gptqmodel(model_dir: str, records, weighting):
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    from maca_kernels.integrations import gptqmodel as mk_gptqmodel

    qm = GPTQModel.load(model_dir, QuantizeConfig(bits=4, group_size=64, offload_to_disk=False), device="cpu",
                        dtype=torch.float32)
    timers = Timers()
    ctx = mk_gptqmodel.backend(weighting=weighting) if weighting else contextlib.nullcontext()
    t0 = time.perf_counter()
    with contextlib.chdir(tempfile.mkdtemp()), ctx, timers.wrap(GPTQ, "add_batch", "hessian"), \
            timers.wrap(GPTQ, "quantize", "solve"):  # GPTQModel writes logs/ into the working directory
        ret = qm.quantize(records, batch_size=1, calibration_concat_size=None, calibration_sort=None,
                          calibration_data_min_length=0)
    wall = time.perf_counter() - t0
    losses = {f"{r['layer']}.{r['module']}": float(r["loss"]) for rows in ret.values() for r in rows
              if "loss" in r and "layer" in r}
    return wall, timers.s, losses


def run_llmcompressor(model_dir: str, records, weighting):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier, base
    from transformers import AutoModelForCausalLM

    from maca_kernels.integrations import llmcompressor as mk_llmc

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=64))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    losses: dict[str, float] = {}
    setres = base.CompressionLogger.set_results

    def keep(self, name=None, loss=None):
        if name == "GPTQ":
            losses[str(len(losses))] = loss
        return setres(self, name=name, loss=loss)

    timers = Timers()
    ctx = mk_llmc.backend(weighting=weighting) if weighting else contextlib.nullcontext()
    t0 = time.perf_counter()
    base.CompressionLogger.set_results = keep
    try:
        with ctx, timers.wrap(base, "accumulate_hessian", "hessian"), timers.wrap(base, "quantize_weight", "solve"):
                oneshot(model=model, dataset=Dataset.from_list(records), recipe=recipe, batch_size=1,
                    num_calibration_samples=len(records), shuffle_calibration_samples=False,
                    max_seq_length=max(len(r["input_ids"]) for r in records), pipeline="sequential")
    finally:
        base.CompressionLogger.set_results = setres
    wall = time.perf_counter() - t0
    return wall, timers.s, losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", choices=("gptqmodel", "llmcompressor"), required=True)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    from maca_kernels import embedded

    model_dir = str(embedded.ensure_model(install=False))
    from transformers import AutoTokenizer

    records = calibration_records(AutoTokenizer.from_pretrained(model_dir), args.sequences, args.seq_len)
    run = run_gptqmodel if args.tool == "gptqmodel" else run_llmcompressor
    run(model_dir, records[:2], "token")  # warm-up: first-use compilation and caches out of the timings
    rows, base_losses = [], None
    for label, weighting in (("tool", None), ("maca_kernels token", "token"), ("maca_kernels sequence", "sequence")):
        wall, s, losses = run(model_dir, records, weighting)
        base_losses = base_losses or losses
        # losses are against each run's own H: comparable for token weighting only
        ratio = sum(losses.values()) / sum(base_losses.values()) if weighting != "sequence" else None
        per_module = sorted(losses[k] / base_losses[k] for k in base_losses) if weighting != "sequence" else None
        rows.append(dict(path=label, wall_s=wall, hessian_s=s.get("hessian", 0.0), solve_s=s.get("solve", 0.0),
                         rest_s=wall - s.get("hessian", 0.0) - s.get("solve", 0.0), loss_sum_vs_tool=ratio,
                         module_ratio_min_median_max=per_module and [per_module[0], per_module[len(per_module) // 2],
                                                                     per_module[-1]],
                         modules=len(losses)))
        print(rows[-1], flush=True)
    meta = dict(tool=args.tool, version=_version(args.tool), model="SmolLM2-135M (embedded, from Q4_1 GGUF)",
                bits=4, group_size=64, sequences=args.sequences, seq_len=args.seq_len, torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                date=datetime.date.today().isoformat())
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"integrations-{args.tool}-cpu"
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [f"{args.tool} {meta['version']} on {meta['model']}, 4-bit g64, {args.sequences}×{args.seq_len} "
             f"tokens, CPU {meta['threads']} threads, {meta['date']}", "",
             "| path | wall s | Hessian s | solve s | rest s | Σ loss / tool's | per module min / median / max |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['wall_s']:.1f} | {r['hessian_s']:.2f} | {r['solve_s']:.2f} | "
                     f"{r['rest_s']:.1f} | {_fmt(r['loss_sum_vs_tool'])} | {_fmt3(r['module_ratio_min_median_max'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(v) -> str:
    return "— (another H)" if v is None else f"{v:.4f}"


def _fmt3(v) -> str:
    return "—" if v is None else " / ".join(f"{x:.3f}" for x in v)


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


if __name__ == "__main__":
    main()
