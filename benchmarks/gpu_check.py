"""``make gpu-check``: the one prepared command for a lent GPU session (SPEC §7).

A GPU (H100 or H200) is lent with 15 minutes of device time for the whole session. This command runs,
with the machine's own ``python3`` (torch 2.11, triton 3.6, no network; the project's ``.venv`` and pins
are not used) and in at most about 8 minutes:

1. build: the C++ extension in place (``setup.py build_ext --inplace``, else an offline
   ``pip install --no-build-isolation --no-deps -e .``); a failed build is recorded and the run goes on,
   the GPU paths do not need it;
2. tests: the GPU tier, ``pytest -q -m gpu tests`` with a time limit (the compile tier and the interpreter
   tests are CPU-checkable and not run here); pass/fail counts from its JUnit XML;
3. benchmarks: the GPU cases of ``bench_hessian`` (including the GPTAQ cross term and the per-call
   overhead), ``bench_gptq`` and ``bench_quant_matmul``, with bounded autotuning
   (``MACA_KERNELS_TUNE=quick``) and short ``do_bench`` windows, each benchmark within a wall-time budget:
   cases left when it runs out are skipped and reported as "not measured" with the reason;
4. pipeline: ``quantize_model`` on 2 layers of a random Llama-3-8B-shaped model (bf16, 32k MaCa tokens), GPTQ
   with the streams on the GPU; one Qwen3-30B-A3B-shaped MoE layer (128 experts); GPTAQ on the 8B shape with the
   streams in pinned host memory: time per layer, its split, peak GPU memory and what each part held (measured
   figures with no §5 target, for the README's projections); it runs in what is left of the total when the §5
   steps are done.

It writes ``benchmarks/results/<date>-<gpu>.json`` and ``.md``: device, driver/CUDA, torch/triton/python
versions, date, the test tier's counts, and every GPU row of SPEC §5 beside its target with pass/fail
(or "not measured" and why), and prints the same table. Both files are rewritten atomically after every
step and case, so a crash or a time-out keeps what was already measured. A rerun fits in what is left
of the session's 15 minutes.

``make gpu-check DRY=1`` (``python -m benchmarks.gpu_check --dry-run``) checks this script on a CPU with
the ``.venv`` python: tiny shapes on the CPU paths, every figure marked as a dry run, files written to a
temporary folder (never to ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

# Wall-time budgets in seconds. A benchmark starts no new case past its budget; a case still running at
# budget + GRACE_S is interrupted. The whole run stops starting steps after TOTAL_S.
BUDGETS_S = {"build": 75, "tests": 105, "hessian": 90, "gptq": 60, "quant_matmul": 120, "pipeline": 60}
GRACE_S = 30
TOTAL_S = 450
GPU_WARMUP_MS, GPU_REP_MS = 10, 60  # do_bench windows (the benchmarks' defaults are 25 / 200)

QMM_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # K × N
QMM_BATCH1 = {4: 3.1, 3: 4.0, 2: 5.9}
QMM_BATCHED_INT4 = {16: 3.0, 128: 1.2, 2048: 0.85}
GPTQ_SHAPES = [(4096, 4096), (14336, 4096)]  # N × K (out × in)
HESSIAN_DIMS = (4096, 8192)
TOKENS = 256 * 1024

# Tiny stand-ins for the dry run (CPU paths): each real case maps to one of these.
DRY = {
    "tokens": 4096,
    "hessian_d": {4096: 64, 8192: 128},
    "per_call": dict(d=64, tokens=1024, calls=3, loops=1),
    "gptq": {(4096, 4096): (128, 128), (14336, 4096): (256, 128)},
    "gptq_tokens": 512,
    "pipeline_tokens": 2048,
    "qmm": {(4096, 4096): (256, 256), (4096, 14336): (256, 512), (14336, 4096): (512, 256), (8192, 28672): (256, 384)},
}


# ---------------------------------------------------------------------------------------------------------------
# SPEC §5 GPU rows, as data. Each entry is one figure with its target; "how" says how it is measured.


@dataclass(frozen=True)
class Target:
    key: str
    operation: str
    case: str
    measure: str
    cmp: str  # ">=" or "<="
    target: float
    unit: str  # "x" (ratio), "%" or "" (a count / plain ratio)
    how: str


_DO_BENCH = "triton do_bench median (L2 flushed before every run)"


def _targets() -> list[Target]:
    t = []
    for d in HESSIAN_DIMS:
        case = f"d={d}, 256k tokens, MaCa mix 128/512/1024/2048, bf16"
        t += [
            Target(f"hessian.d{d}.vs_cublas", "accumulate_hessian", case, "speedup vs cuBLAS bf16 xᵀx (fp32 out)",
                   ">=", 1.3, "x", f"{_DO_BENCH}; baseline torch.mm(x.T, x, out_dtype=float32), no weighting "
                   "(falls back to a bf16 matmul + upcast, said in the detail, where out_dtype is missing)"),
            Target(f"hessian.d{d}.vs_reference", "accumulate_hessian", case, "speedup vs reference fp32 accumulation",
                   ">=", 10.0, "x", f"{_DO_BENCH}; reference: upcast, H += w·X_sᵀX_s per sequence (reference.py)"),
            Target(f"hessian.d{d}.error", "accumulate_hessian", case, "error vs fp64 / fp32-matmul error vs fp64",
                   "<=", 1.0, "", "relative Frobenius errors vs a float64 Gram of the same bf16 values; the "
                   "fp32-matmul error is the reference fp32 accumulation's"),
        ]
    for N, K in GPTQ_SHAPES:
        case = f"{N}x{K}, 4-bit g128, act-order"
        t += [
            Target(f"gptq.{N}x{K}.speedup", "gptq_quantize", case, "speedup vs reference (plain PyTorch)", ">=", 20.0,
                   "x", "wall time of one solve after one warm-up (the reference at 14336x4096: one cold call, or "
                   "skipped when its predicted time exceeds the budget)"),
            Target(f"gptq.{N}x{K}.loss", "gptq_quantize", case, "|loss / reference loss − 1|", "<=", 0.5, "%",
                   "loss tr(ΔW H ΔWᵀ) of both solves on the same correlated-activation problem"),
        ]
    for bits, target in QMM_BATCH1.items():
        for K, N in QMM_SHAPES:
            t.append(Target(f"qmm.m1.int{bits}.{K}x{N}", "quant_matmul", f"batch 1, K×N={K}×{N}, int{bits} g128",
                            "speedup vs fp16 torch.matmul", ">=", target, "x", f"{_DO_BENCH}, both in CUDA graphs"))
    for bits, target in QMM_BATCH1.items():
        for K, N in QMM_SHAPES:
            t.append(Target(f"qmm.cuda.m1.int{bits}.{K}x{N}", "quant_matmul (CUDA mma GEMV, opt-in)",
                            f"batch 1, K×N={K}×{N}, int{bits} g128", "speedup vs fp16 torch.matmul", ">=", target,
                            "x", f"{_DO_BENCH}, both in CUDA graphs; DecodeWeight.matmul(x, backend='cuda')"))
    for M, target in QMM_BATCHED_INT4.items():
        for K, N in QMM_SHAPES:
            graphs = ", both in CUDA graphs" if M <= 16 else ""
            t.append(Target(f"qmm.m{M}.int4.{K}x{N}", "quant_matmul", f"batch {M}, K×N={K}×{N}, int4 g128",
                            "speedup vs fp16 torch.matmul", ">=", target, "x", _DO_BENCH + graphs))
            # the CUDA GEMV's _m16 kernels up to 16 rows; above, the Triton kernels on its layout (what a
            # QuantLinear with the CUDA GEMV on runs: it keeps no other copy of the weight)
            op = "quant_matmul (CUDA mma GEMV, opt-in)" if M <= 16 else "quant_matmul (mma layout, Triton; opt-in)"
            t.append(Target(f"qmm.cuda.m{M}.int4.{K}x{N}", op, f"batch {M}, K×N={K}×{N}, int4 g128",
                            "speedup vs fp16 torch.matmul", ">=", target, "x",
                            f"{_DO_BENCH}{graphs}; DecodeWeight.matmul(x, backend='cuda')"))
    for K, N in QMM_SHAPES:
        t.append(Target(f"qmm.act_order.{K}x{N}", "quant_matmul", f"act-order, batch 1, K×N={K}×{N}, int4 g128",
                        "act-order time / sorted-group time", "<=", 1.1, "x",
                        f"{_DO_BENCH}, CUDA graphs; same packed weight with a permuted g_idx vs g_idx=None"))
        t.append(Target(f"qmm.cuda.act_order.{K}x{N}", "quant_matmul (CUDA mma GEMV, opt-in)",
                        f"act-order, batch 1, K×N={K}×{N}, int4 g128", "act-order time / sorted-group time", "<=",
                        1.1, "x", f"{_DO_BENCH}, CUDA graphs; x gathered in the kernel vs the sorted weight"))
    cross = "d=4096, 256k tokens, MaCa mix, bf16"
    t += [
        Target("hessian.cross.time", "GPTAQ cross term Σ w ΔXᵀX", cross, "time / time of H", "<=", 2.0, "x",
               f"{_DO_BENCH}; gram_from_plan(plan, cross=True) vs gram_from_plan(plan) on the same plan"),
        Target("hessian.cross.error", "GPTAQ cross term Σ w ΔXᵀX", cross, "error vs fp64 / fp32-matmul error vs fp64",
               "<=", 1.0, "", "relative Frobenius errors vs float64; fp32 matmul: gram_from_plan(backend='reference')"),
    ]
    per_call = "16k tokens, d=4096, bf16, MaCa mix"
    how = ("median over 5 loops of (wall time of 50 back-to-back calls, one sync at the end) / 50, vs do_bench "
           "median of one call; overhead = loop / alone − 1")
    sync_how = "synchronising CUDA calls torch reports during one call (torch.cuda.set_sync_debug_mode('warn'))"
    for label, sfx in (("HessianAccumulator.add, default args", ""),
                       ("accumulate_hessian(out=H), check_finite=False", "_nocheck")):
        t += [
            Target(f"hessian.per_call.overhead{sfx}", "accumulate_hessian per call", f"{per_call}, {label}",
                   "overhead beyond the kernel", "<=", 5.0, "%", how),
            Target(f"hessian.per_call.syncs{sfx}", "accumulate_hessian per call", f"{per_call}, {label}",
                   "host syncs per call", "<=", 0, "", sync_how),
        ]
    return t


TARGETS = _targets()


# ---------------------------------------------------------------------------------------------------------------
# The run: state, atomic result files, steps.


class StepTimeout(Exception):
    """Raised inside a case that ran past its step's budget + grace."""


@dataclass
class Run:
    out_dir: str
    dry: bool
    started: float = field(default_factory=time.monotonic)
    env: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    tests: dict = field(default_factory=lambda: {"status": "not run"})
    values: dict = field(default_factory=dict)  # key → {"value", "detail"}
    reasons: dict = field(default_factory=dict)  # key → why not measured
    raw: dict = field(default_factory=dict)  # step → benchmark rows
    status: str = "running"
    stem: str | None = None

    # -- files ----------------------------------------------------------------------------------------------
    def paths(self) -> tuple[str, str]:
        stem = self.stem
        if stem is None:
            date = self.env.get("date", "")[:10] or datetime.date.today().isoformat()
            gpu = "dry-run-cpu" if self.dry else _slug(self.env.get("device", "no-gpu"))
            stem = f"{date}-{gpu}"
            if self.env.get("device"):  # fixed once the device is known
                self.stem = stem
        base = os.path.join(self.out_dir, stem)
        return base + ".json", base + ".md"

    def document(self) -> dict:
        rows = [self.target_row(t) for t in TARGETS]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "not measured", "dry run")}
        return {
            "dry_run": self.dry,
            "note": DRY_NOTE if self.dry else "GPU figures, measured by benchmarks/gpu_check.py (make gpu-check)",
            "status": self.status,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "environment": self.env,
            "settings": {
                "MACA_KERNELS_TUNE": os.environ.get("MACA_KERNELS_TUNE"),
                "do_bench_ms": {"warmup": GPU_WARMUP_MS, "rep": GPU_REP_MS},
                "budgets_s": BUDGETS_S, "grace_s": GRACE_S, "total_s": TOTAL_S,
            },
            "steps": self.steps,
            "tests": self.tests,
            "summary": counts,
            "targets": rows,
            "raw": self.raw,
        }

    def target_row(self, t: Target) -> dict:
        row = asdict(t)
        got = self.values.get(t.key)
        if got is None or got["value"] is None:
            row.update(value=None, status="not measured",
                       reason=self.reasons.get(t.key) or (got or {}).get("detail") or "not reached in this run")
        else:
            v = got["value"]
            ok = (v >= t.target) if t.cmp == ">=" else (v <= t.target)
            row.update(value=v, detail=got.get("detail", ""),
                       status="dry run" if self.dry else ("pass" if ok and not math.isnan(v) else "fail"))
        return row

    def save(self) -> None:
        """Rewrite both files atomically (temp file + rename): a reader never sees half a file."""
        os.makedirs(self.out_dir, exist_ok=True)
        doc = self.document()
        json_path, md_path = self.paths()
        _atomic_write(json_path, json.dumps(doc, indent=1, default=str) + "\n")
        _atomic_write(md_path, render_markdown(doc))

    # -- recording ------------------------------------------------------------------------------------------
    def measured(self, key: str, value: float | None, detail: str = "") -> None:
        assert key in TARGET_KEYS, key
        self.values[key] = {"value": None if value is None else float(value), "detail": detail}

    def not_measured(self, keys, reason: str) -> None:
        for k in keys:
            if k not in self.values:
                self.reasons.setdefault(k, reason)


TARGET_KEYS = {t.key for t in TARGETS}
DRY_NOTE = ("DRY RUN on the CPU with tiny shapes: checks gpu_check.py itself. No figure here is a GPU "
            "measurement; statuses read 'dry run', never pass/fail.")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt_value(v: float | None, unit: str, dry: bool) -> str:
    if v is None:
        return ""
    s = f"{v:.2f}×" if unit == "x" else f"{v:.2f}%" if unit == "%" else f"{v:.3g}"
    return f"dry: {s}" if dry else s


def _fmt_target(t: dict) -> str:
    unit = {"x": "×", "%": "%"}.get(t["unit"], "")
    return f"{'≥' if t['cmp'] == '>=' else '≤'} {t['target']:g}{unit}"


def render_markdown(doc: dict) -> str:
    env, tests, dry = doc["environment"], doc["tests"], doc["dry_run"]
    title = "DRY RUN (CPU, tiny shapes) — not GPU figures" if dry else f"GPU check: {env.get('device', '?')}"
    lines = [f"# {title}", ""]
    if dry:
        lines += [f"**{DRY_NOTE}**", ""]
    lines += [
        f"- date: {env.get('date', '?')}; run status: {doc['status']} after {doc['elapsed_s']} s",
        f"- device: {env.get('device', '?')} (compute capability {env.get('compute_capability', '-')}, "
        f"{env.get('sms', '-')} SMs, {env.get('gpu_memory_gib', '-')} GiB); driver {env.get('driver', '-')}, "
        f"CUDA {env.get('cuda', '-')}",
        f"- python {env.get('python', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
        f"CPU {env.get('cpu', '?')}",
        f"- autotuning: MACA_KERNELS_TUNE={doc['settings']['MACA_KERNELS_TUNE']}; do_bench warmup/rep "
        f"{GPU_WARMUP_MS}/{GPU_REP_MS} ms",
        f"- GPU test tier (`{tests.get('command', 'pytest -q -m gpu tests')}`): {tests_line(tests)}",
        f"- §5 figures: {doc['summary']['pass']} pass, {doc['summary']['fail']} fail, "
        f"{doc['summary']['not measured']} not measured" + (f", {doc['summary']['dry run']} dry" if dry else ""),
        "",
        "| operation | case | measure | target | value | status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t in doc["targets"]:
        status = t["status"] if t["status"] != "not measured" else f"not measured: {t['reason']}"
        value = _fmt_value(t["value"], t["unit"], dry)
        cells = (t["operation"], t["case"], t["measure"], _fmt_target(t), value, status)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    batches = [r for r in doc["raw"].get("pipeline", []) if r.get("kind") == "experts batched"]
    for r in batches:
        lines += ["", f"Experts' solves ({r['experts']} of {r['shape']}, 4-bit g{r['group_size']} act-order): "
                      f"one by one {r['looped_s']:.3f} s, gptq_quantize_batched {r['batched_s']:.3f} s "
                      f"({r['ratio']:.2f}×), codes {'identical' if r['same_codes'] else 'DIFFERENT'}"]
    if any(r.get("kind") != "experts batched" for r in doc["raw"].get("pipeline", [])):
        lines += ["", "## Pipeline (measured; no §5 target)", "",
                  "| model | method | tokens | activations on | s per layer | forward s | Hessian s | solve s | "
                  "peak MB | held MB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in doc["raw"]["pipeline"]:
            if r.get("kind") == "experts batched":
                continue
            held = ", ".join(f"{k} {v:.0f}" for k, v in r["memory_mb"].items())
            lines.append(f"| {r['model']} | {r['method']} | {r['tokens']} | {r['activations_on']} | "
                         f"{r['per_layer_s']:.2f} | {r['forward_s']:.2f} | {r['hessian_s']:.2f} | {r['solve_s']:.2f} | "
                         f"{r['peak_mb']:.0f} | {held} |")
    lines += ["", "## Steps", ""]
    for s in doc["steps"]:
        lines.append(f"- {s['name']}: {s['status']} ({s.get('seconds', 0):.0f} s)" + (f" — {s['note']}" if s.get("note")
                                                                                   else ""))
    lines += ["", "## Details", ""]
    for t in doc["targets"]:
        if t.get("detail"):
            lines.append(f"- `{t['key']}`: {t['detail']}")
    lines += ["", "How each figure is measured:", ""]
    hows: dict[str, list[str]] = {}
    for t in doc["targets"]:
        hows.setdefault(t["how"], []).append(t["key"])
    for how, keys in hows.items():
        lines.append(f"- {', '.join(f'`{k}`' for k in keys)}: {how}")
    return "\n".join(lines) + "\n"


def tests_line(tests: dict) -> str:
    if "passed" not in tests:
        return tests.get("status", "not run") + (f" ({tests['note']})" if tests.get("note") else "")
    s = (f"{tests['status']}: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
         f"{tests['skipped']} skipped in {tests.get('seconds', 0):.0f} s")
    if tests.get("failures"):
        s += "; failing: " + ", ".join(tests["failures"][:10])
    return s + (f" ({tests['note']})" if tests.get("note") else "")


# ---------------------------------------------------------------------------------------------------------------
# Budgeted execution.


def _on_alarm(signum, frame):
    raise StepTimeout("case ran past its benchmark's budget + grace")


def _with_alarm(seconds: float, fn: Callable[[], object]):
    """Run fn, raising StepTimeout in it after ``seconds`` (main thread only; elsewhere no limit)."""
    try:
        old = signal.signal(signal.SIGALRM, _on_alarm)
    except ValueError:  # not the main thread
        return fn()
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Case:
    label: str
    keys: list[str]
    run: Callable[[], tuple[list[dict], dict]]  # → (benchmark rows, {key: (value, detail)})
    estimate_s: Callable[[], float | None] = lambda: None  # predicted wall time, when known


def run_cases(run: Run, step: str, cases: list[Case], budget: float) -> str:
    """Run cases in order within ``budget`` seconds; record values, rows and reasons; save after each."""
    t0 = time.monotonic()
    notes, status = [], "ok"
    for case in cases:
        elapsed = time.monotonic() - t0
        left = min(budget - elapsed, TOTAL_S - (time.monotonic() - run.started))
        est = case.estimate_s()
        if left <= 0 or (est is not None and est > left):
            why = (f"skipped: the {step} budget ({budget:.0f} s) was used up" if left <= 0 else
                   f"skipped: predicted {est:.0f} s exceeds the {left:.0f} s left of the {step} budget")
            run.not_measured(case.keys, f"{case.label}: {why}")
            notes.append(f"{case.label} {why}")
            status = "partial"
            continue
        try:
            rows, values = _with_alarm(left + GRACE_S, case.run)
        except StepTimeout:
            run.not_measured(case.keys, f"{case.label}: interrupted after the {step} budget + {GRACE_S} s grace")
            notes.append(f"{case.label} interrupted (budget)")
            status = "partial"
            _free_gpu()
            continue
        except Exception as e:  # one failing case must not cost the others
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            run.not_measured(case.keys, f"{case.label} failed: {msg}")
            notes.append(f"{case.label} failed: {msg}")
            run.raw.setdefault(step + "_errors", []).append({"case": case.label, "traceback": traceback.format_exc()})
            status = "partial"
            _free_gpu()
            continue
        run.raw.setdefault(step, []).extend(rows)
        for key, (value, detail) in values.items():
            run.measured(key, value, detail)
        run.not_measured(case.keys, f"{case.label}: no value produced")
        _free_gpu()
        run.save()
    run.steps[-1]["note"] = "; ".join(notes)
    return status


def _free_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Steps. Each takes the Run and returns its status ("ok", "partial", "failed", "skipped"); exceptions are
# caught by run_steps and recorded.


def step_environment(run: Run) -> str:
    from benchmarks import common

    run.env = common.environment()
    run.env["MACA_KERNELS_TUNE"] = os.environ.get("MACA_KERNELS_TUNE")
    if run.dry:
        run.env["device"] = f"cpu ({run.env.get('cpu', '?')}) — DRY RUN"
    elif run.env.get("device") == "cpu":
        raise RuntimeError("no CUDA device visible to torch: nothing to measure (use --dry-run on a CPU)")
    return "ok"


def step_build(run: Run) -> str:
    if run.dry:
        run.steps[-1]["note"] = "dry run: not rebuilt (make build built the .venv extension); " + _native_status()
        return "skipped"
    py = sys.executable
    attempts = [
        [py, "setup.py", "build_ext", "--inplace"],
        [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
    ]
    t0, log = time.monotonic(), []
    for cmd in attempts:
        left = BUDGETS_S["build"] - (time.monotonic() - t0)
        if left <= 5:
            break
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            ok, tail = p.returncode == 0, (p.stdout + p.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            ok, tail = False, f"timed out after {left:.0f} s"
        log.append({"command": " ".join(cmd[1:]), "ok": ok, "output_tail": tail})
        if ok:
            break
    run.raw["build"] = log
    run.steps[-1]["note"] = ("built with: " + log[-1]["command"] if log and log[-1]["ok"] else
                             "C++ build failed (continuing: the GPU paths do not need it)") + "; " + _native_status()
    return "ok" if log and log[-1]["ok"] else "failed"


def _native_status() -> str:
    from maca_kernels import _native  # first import of the package here: after the build

    return "maca_kernels._C imports" if _native._C is not None else "maca_kernels._C does not import"


def step_tests(run: Run) -> str:
    budget = BUDGETS_S["tests"]
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "gpu-tier.xml")
        # The dry run collects only the GPU test files (every test skips on a CPU): same runner, less time.
        paths = sorted(glob.glob("tests/**/test_*_gpu.py", root_dir=ROOT, recursive=True)) if run.dry else ["tests"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *paths, "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "--ignore=tests/test_compile_tier.py", f"--junitxml={xml}"]
        if _has_module("pytest_timeout"):
            cmd.append("--timeout=60")
        shown = f"pytest -q -m gpu {' '.join(paths)}" + (" --timeout=60" if "--timeout=60" in cmd else "")
        run.tests = {"command": shown, "status": "running"}
        run.save()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        note = ""
        try:
            out, _ = proc.communicate(timeout=budget)
        except subprocess.TimeoutExpired:  # SIGINT: pytest stops, prints its summary and writes the XML
            proc.send_signal(signal.SIGINT)
            note = f"stopped after the {budget} s budget: counts cover the tests that ran"
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        run.tests = {"command": shown, "seconds": round(time.monotonic() - t0, 1), "returncode": proc.returncode,
                     **parse_junit(xml), "output_tail": out[-3000:]}
    if "passed" not in run.tests:
        run.tests["status"] = "no result"
        note = note or "pytest wrote no JUnit XML"
    elif run.dry:
        run.tests["status"] = "dry run"
        note = "on a CPU every GPU test skips"
    elif run.tests["passed"] + run.tests["failed"] + run.tests["errors"] == 0:
        run.tests["status"] = "fail"
        note = note or "no GPU test ran (all skipped or none collected)"
    elif run.tests["failed"] + run.tests["errors"]:
        run.tests["status"] = "fail"
    else:  # every test that ran passed; "partial" when the budget stopped the tier before its end
        run.tests["status"] = "partial" if note else "pass"
    if note:
        run.tests["note"] = note
    run.steps[-1]["note"] = tests_line(run.tests)
    if run.dry or run.tests["status"] == "pass":
        return "ok"
    return "partial" if run.tests["status"] == "partial" else "failed"


def parse_junit(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"], "failures": failing}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _setup_timers(run: Run):
    from benchmarks import common

    if run.dry:
        return "cpu", lambda fn: common.time_cpu(fn, warmup=0, reps=1)
    common.GPU_WARMUP_MS, common.GPU_REP_MS = GPU_WARMUP_MS, GPU_REP_MS
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    return "cuda", common.time_gpu


def _ratio(a: float, b: float) -> float:
    """a / b, without dying on a zero error (two exact results compare as equal)."""
    return a / b if b else (1.0 if a == b else math.inf)


def _by_impl(rows: list[dict], prefix: str) -> dict:
    return next(r for r in rows if r.get("impl", "").startswith(prefix))


def step_hessian(run: Run) -> str:
    from benchmarks import bench_hessian as bh

    device, timer = _setup_timers(run)
    tokens = DRY["tokens"] if run.dry else TOKENS

    def maca(d: int):
        dd = DRY["hessian_d"][d] if run.dry else d
        rows = bh.maca_case(dd, tokens, device=device, timer=timer)
        ours, cub, ref = (_by_impl(rows, p) for p in ("maca_kernels", "cuBLAS", "reference"))
        shown = f"d={dd}, {tokens} tokens: " if run.dry else ""
        return rows, {
            f"hessian.d{d}.vs_cublas": (cub["ms"] / ours["ms"], f"{shown}ours {ours['ms']:.3g} ms, cuBLAS "
                                        f"{cub['ms']:.3g} ms via {cub.get('method')}"),
            f"hessian.d{d}.vs_reference": (ref["ms"] / ours["ms"], f"{shown}ours {ours['ms']:.3g} ms, reference "
                                           f"{ref['ms']:.3g} ms"),
            f"hessian.d{d}.error": (_ratio(ours["rel_err_fp64"], ref["rel_err_fp64"]),
                                    f"{shown}ours {ours['rel_err_fp64']:.3g}, fp32 reference "
                                    f"{ref['rel_err_fp64']:.3g}, "
                                    f"cuBLAS bf16 (unweighted) {cub['rel_err_fp64']:.3g}"),
        }

    def cross():
        d = DRY["hessian_d"][4096] if run.dry else 4096
        rows = bh.cross_term_case(d, tokens, device=device, timer=timer)
        h, c, ref = (_by_impl(rows, p) for p in ("maca_kernels H", "maca_kernels cross", "reference"))
        return rows, {
            "hessian.cross.time": (c["time_vs_H"], f"cross {c['ms']:.3g} ms, H {h['ms']:.3g} ms"),
            "hessian.cross.error": (_ratio(c["rel_err_fp64"], ref["rel_err_fp64"]),
                                    f"ours {c['rel_err_fp64']:.3g}, fp32 reference {ref['rel_err_fp64']:.3g}"),
        }

    def per_call():
        kw = DRY["per_call"] if run.dry else {}
        rows = bh.per_call_case(device=device, timer=timer, **kw)
        values = {}
        for row, sfx in zip(rows, ("", "_nocheck"), strict=True):
            detail = f"loop {row['ms']:.4g} ms/call, alone {row['kernel_ms']:.4g} ms"
            values[f"hessian.per_call.overhead{sfx}"] = (100 * row["overhead"], detail)
            syncs = row["host_syncs"]
            values[f"hessian.per_call.syncs{sfx}"] = (syncs, "" if syncs is not None else
                                                      "no CUDA sync debug mode off a GPU (dry run)")
        return rows, values

    keys = lambda *prefixes: [k for k in TARGET_KEYS if k.startswith(prefixes)]  # noqa: E731
    cases = [
        Case("hessian d=4096", keys("hessian.d4096."), lambda: maca(4096)),
        Case("GPTAQ cross term d=4096", keys("hessian.cross."), cross),
        Case("per-call overhead 16k tokens d=4096", keys("hessian.per_call."), per_call),
        Case("hessian d=8192", keys("hessian.d8192."), lambda: maca(8192)),
    ]
    return run_cases(run, "hessian", cases, BUDGETS_S["hessian"])


def step_gptq(run: Run) -> str:
    from benchmarks import bench_gptq as bg

    device, _ = _setup_timers(run)
    ref_ms = {}

    def solve(N: int, K: int, ref_warmup: bool):
        n, k = DRY["gptq"][(N, K)] if run.dry else (N, K)
        tokens = DRY["gptq_tokens"] if run.dry else 8192
        rows = bg.gpu_case(n, k, methods=("gptq",), device=device, ref_warmup=ref_warmup, tokens=tokens)
        ours, ref = _by_impl(rows, "maca_kernels"), _by_impl(rows, "reference")
        ref_ms[(N, K)] = ref["ms"]
        shown = f"{n}x{k}: " if run.dry else ""
        return rows, {
            f"gptq.{N}x{K}.speedup": (ours["speedup"], f"{shown}ours {ours['ms']:.4g} ms, reference {ref['ms']:.4g} ms "
                                      f"({ref['timing']})"),
            f"gptq.{N}x{K}.loss": (100 * abs(ours["loss_vs_ref"]), f"loss {ours['loss']:.6g} vs reference "
                                   f"{ref['loss']:.6g}"),
        }

    def estimate_big():  # the reference is launch-bound (K columns × a few small kernels): ~the 4096 case
        t = ref_ms.get((4096, 4096))
        return None if t is None else 2 * t / 1e3 + 20  # reference + problem set-up + kernel, generously

    (N0, K0), (N1, K1) = GPTQ_SHAPES
    cases = [
        Case(f"gptq {N0}x{K0}", [f"gptq.{N0}x{K0}.speedup", f"gptq.{N0}x{K0}.loss"], lambda: solve(N0, K0, True)),
        Case(f"gptq {N1}x{K1}", [f"gptq.{N1}x{K1}.speedup", f"gptq.{N1}x{K1}.loss"], lambda: solve(N1, K1, False),
             estimate_s=estimate_big),
    ]
    return run_cases(run, "gptq", cases, BUDGETS_S["gptq"])


def step_quant_matmul(run: Run) -> str:
    from benchmarks import bench_quant_matmul as bq

    device, timer = _setup_timers(run)
    bw = None if run.dry else bq.copy_bandwidth()
    if bw:
        run.env["copy_bandwidth_gbs"] = round(bw, 1)

    def shape(K: int, N: int):
        return DRY["qmm"][(K, N)] if run.dry else (K, N)

    def speedups(K: int, N: int, bits: int, Ms):
        k, n = shape(K, N)
        rows = bq.gpu_case(k, n, bits, Ms=Ms, device=device, timer=timer, bw=bw)
        values = {}
        for r in rows:
            if not r["impl"].startswith("maca_kernels") or r.get("speedup") is None:
                continue
            base = next(b for b in rows if b["impl"] == "torch fp16 matmul" and b["M"] == r["M"])
            cuda = r["impl"] in (bq.MMA_IMPL, bq.MMA_TRITON_IMPL)
            key = f"qmm.{'cuda.' if cuda else ''}m{r['M']}.int{bits}.{K}x{N}"
            if key in TARGET_KEYS:
                bwf = f", {100 * r['bw_fraction']:.0f}% of copy bandwidth" if r.get("bw_fraction") else ""
                values[key] = (r["speedup"], f"{f'{k}x{n}: ' if run.dry else ''}ours {r['ms'] * 1e3:.4g} µs, "
                               f"fp16 {base['ms'] * 1e3:.4g} µs{bwf}")
        return rows, values

    def act_order(K: int, N: int):
        k, n = shape(K, N)
        rows = bq.act_order_case(k, n, device=device, timer=timer)
        act, srt = _by_impl(rows, "maca_kernels act-order, decode layout"), _by_impl(rows, "maca_kernels sorted")
        values = {f"qmm.act_order.{K}x{N}": (act["vs_sorted"], f"act-order {act['ms'] * 1e3:.4g} µs, sorted "
                                             f"{srt['ms'] * 1e3:.4g} µs")}
        act_c = [r for r in rows if r["impl"] == "maca_kernels CUDA mma GEMV act-order" and "ms" in r]
        srt_c = [r for r in rows if r["impl"] == "maca_kernels CUDA mma GEMV sorted"]
        if act_c and srt_c:
            values[f"qmm.cuda.act_order.{K}x{N}"] = (act_c[0]["vs_sorted"], f"act-order {act_c[0]['ms'] * 1e3:.4g} "
                                                     f"µs, sorted {srt_c[0]['ms'] * 1e3:.4g} µs")
        return rows, values

    cases = []
    for K, N in QMM_SHAPES:
        Ms = (1, *QMM_BATCHED_INT4)
        cases += [
            Case(f"quant_matmul {K}x{N} int4 M={Ms}",
                 [f"qmm.m{M}.int4.{K}x{N}" for M in Ms] + [f"qmm.cuda.m{M}.int4.{K}x{N}" for M in Ms],
                 lambda K=K, N=N, Ms=Ms: speedups(K, N, 4, Ms)),
            Case(f"quant_matmul {K}x{N} int3 M=1", [f"qmm.m1.int3.{K}x{N}", f"qmm.cuda.m1.int3.{K}x{N}"],
                 lambda K=K, N=N: speedups(K, N, 3, (1,))),
            Case(f"quant_matmul {K}x{N} int2 M=1", [f"qmm.m1.int2.{K}x{N}", f"qmm.cuda.m1.int2.{K}x{N}"],
                 lambda K=K, N=N: speedups(K, N, 2, (1,))),
            Case(f"quant_matmul {K}x{N} act-order int4 M=1", [f"qmm.act_order.{K}x{N}", f"qmm.cuda.act_order.{K}x{N}"],
                 lambda K=K, N=N: act_order(K, N)),
        ]
    return run_cases(run, "quant_matmul", cases, BUDGETS_S["quant_matmul"])


def step_pipeline(run: Run) -> str:
    import torch

    from benchmarks import bench_moe as bm
    from benchmarks import bench_pipeline as bp

    shape, tokens = (bp.TINY_LLAMA, DRY["pipeline_tokens"]) if run.dry else (bp.LLAMA3_8B, 32768)
    device = "cpu" if run.dry else "cuda"
    dtype = torch.float32 if run.dry else torch.bfloat16

    def case(method: str, activations: str):
        return [bp.random_llama(shape, 2, tokens, dtype, method, device, activations)], {}

    def moe():
        kw = dict(experts=8, tokens=DRY["pipeline_tokens"], shape=bm.TINY_MOE) if run.dry else dict(experts=128,
                                                                                                 tokens=32768)
        return [bm.one_layer(device=device, dtype=dtype, **kw)], {}

    def batched():
        kw = dict(experts=4, d=64, inter=32, device="cpu") if run.dry else dict(device="cuda")
        return [dict(bm.batched_vs_looped(**kw), kind="experts batched")], {}

    cases = [Case("pipeline: 16 experts' solves, batched vs one by one", [], batched),
             Case("pipeline gptq, streams on the device", [], lambda: case("gptq", "device")),
             Case("pipeline: one Qwen3-30B-A3B-shaped MoE layer", [], moe),
             Case("pipeline gptaq, streams in host memory", [], lambda: case("gptaq", "host"))]
    return run_cases(run, "pipeline", cases, BUDGETS_S["pipeline"])


STEPS: list[tuple[str, Callable[[Run], str]]] = [
    ("environment", step_environment),
    ("build", step_build),
    ("tests", step_tests),
    ("hessian", step_hessian),
    ("gptq", step_gptq),
    ("quant_matmul", step_quant_matmul),
    ("pipeline", step_pipeline),
]

STEP_KEYS = {
    "hessian": [k for k in TARGET_KEYS if k.startswith("hessian.")],
    "gptq": [k for k in TARGET_KEYS if k.startswith("gptq.")],
    "quant_matmul": [k for k in TARGET_KEYS if k.startswith("qmm.")],
    "pipeline": [],  # measured figures without a target (the README's projections)
}


def run_steps(run: Run, steps=None) -> Run:
    """Run the steps in order, saving after each; a step that raises is recorded and the rest still run.
    KeyboardInterrupt (e.g. ``timeout -s INT``) saves what there is, marks the run interrupted and re-raises."""
    os.environ.setdefault("MACA_KERNELS_TUNE", "quick")  # bounded autotuning (the launchers read it)
    t0 = time.monotonic()
    try:
        for name, fn in steps or STEPS:
            if time.monotonic() - run.started > TOTAL_S:
                run.steps.append({"name": name, "status": "skipped", "seconds": 0.0,
                                  "note": f"the run's {TOTAL_S} s total was used up"})
                run.not_measured(STEP_KEYS.get(name, []), f"{name} step skipped: the run's {TOTAL_S} s were used up")
                run.save()
                continue
            if name in STEP_KEYS and not run.dry and run.env.get("device", "cpu") == "cpu":
                run.steps.append({"name": name, "status": "skipped", "seconds": 0.0, "note": "no CUDA device"})
                run.not_measured(STEP_KEYS[name], f"{name} step skipped: no CUDA device")
                run.save()
                continue
            t0 = time.monotonic()
            run.steps.append({"name": name, "status": "running", "note": ""})
            if run.env:  # the file name needs the device: the first save comes after the environment step
                run.save()
            try:
                status = fn(run)
            except Exception as e:
                status = "failed"
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                run.steps[-1]["note"] = msg
                run.steps[-1]["traceback"] = traceback.format_exc()
                run.not_measured(STEP_KEYS.get(name, []), f"{name} step failed: {msg}")
            run.steps[-1].update(status=status, seconds=round(time.monotonic() - t0, 1))
            print(f"[gpu-check] {name}: {status} ({run.steps[-1]['seconds']:.0f} s)"
                  + (f" — {run.steps[-1]['note']}" if run.steps[-1].get("note") else ""), flush=True)
            run.save()
        run.status = "complete"
    except KeyboardInterrupt:
        run.status = "interrupted (time limit or Ctrl-C): partial results"
        if run.steps and run.steps[-1]["status"] == "running":
            run.steps[-1].update(status="interrupted", seconds=round(time.monotonic() - t0, 1))
        raise
    finally:
        if run.status == "running":
            run.status = "crashed: partial results"
        run.save()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU check of this script: tiny shapes, no GPU figures")
    p.add_argument("--out", help="output folder (default: benchmarks/results/, or a temporary folder for --dry-run)")
    args = p.parse_args(argv)
    out = args.out or (tempfile.mkdtemp(prefix="gpu-check-dry-") if args.dry_run else RESULTS_DIR)
    if args.dry_run and os.path.realpath(out) == os.path.realpath(RESULTS_DIR):
        p.error("a dry run never writes to benchmarks/results/")
    if args.dry_run:  # one thread: a dry run checks logic, and busy shared CPUs make OpenMP spin-waits slow
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    run = Run(out_dir=out, dry=args.dry_run)
    code = 130
    try:
        run_steps(run)
        code = 0 if all(s["status"] in ("ok", "skipped") for s in run.steps) else 1
    finally:
        json_path, md_path = run.paths()
        with open(md_path) as f:
            print(f.read())
        print(f"[gpu-check] wrote {json_path} and {md_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
