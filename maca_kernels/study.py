"""The MaCa study (``maca-kernels study`` / ``make study``): does length-aware calibration help GPTQ / GPTAQ,
and does saliency regularisation stop GPTQ from overfitting its calibration domain?

Model: the embedded SmolLM2-135M. Calibration: the Jargon File's first 90% of tokens. Evaluation, never
overlapping the calibration stream: the held-out last 10% of the Jargon File, split into a validation half
(the only text λ is chosen on) and a test half (reported, in domain), and the King James Bible (out of
domain, never used for any choice), at several evaluation lengths.

Every run is one cell (bits, method, calibration scheme, weighting, λ, seed) and writes one JSON file in
``<out>/runs/`` as soon as it finishes; a rerun skips the cells already there (resumable, nothing finished
is lost). ``summarize`` turns the run files into mean ± std tables, the λ choice and plots.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

from . import calibration
from .evaluate import perplexity

TEXTS = ("jargon_val", "jargon_test", "bible")  # λ is chosen on jargon_val only
SCHEMES = {  # name -> (calibration sampler, weighting)
    "fixed": ("fixed", "token"),  # classic GPTQ: fixed-length windows, every token one sample
    "maca": ("matryoshka", "sequence"),  # MaCa: mixed lengths, every sequence one sample
    "mix-token": ("matryoshka", "token"),  # ablation: MaCa's lengths without the per-sequence weighting
    "fixed-seq": ("fixed", "sequence"),  # ablation: per-sequence weighting of fixed-length windows
}


@dataclass(frozen=True)
class Cell:
    bits: int
    method: str  # "fp" | "rtn" | "gptq" | "gptaq"
    scheme: str = "-"  # key of SCHEMES, "-" for fp / rtn
    reg: float = 0.0  # saliency regularisation λ
    seed: int = 0
    group_size: int = 0  # 0: the study's; another value is written into the key ("-g32")

    @property
    def key(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        if self.method in ("fp", "rtn"):
            return self.method if self.method == "fp" else f"{self.bits}b-rtn{g}"
        return f"{self.bits}b-{self.method}-{self.scheme}-reg{self.reg:g}{g}-s{self.seed}"

    @property
    def group(self) -> str:
        """The cell without its seed: what the table averages over."""
        return self.key.rsplit("-s", 1)[0] if self.method in ("gptq", "gptaq") else self.key

    @property
    def base(self) -> str:
        """The cell without λ and seed: what λ is chosen within."""
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"{self.bits}b-{self.method}-{self.scheme}{g}"


@dataclass(frozen=True)
class StudyConfig:
    bits: tuple = (4, 3, 2)
    group_size: int = 64  # SmolLM2's hidden size 576 is not a multiple of 128
    seeds: tuple = (0, 1, 2)
    # λ grids, swept at the first seed; a grid is doubled while the λ chosen sits at its top (up to MAX_LAMBDA),
    # then every seed runs at the λ chosen
    lambdas: tuple = (0.0, 0.05, 0.5, 1.0, 2.0, 4.0, 8.0)
    gptaq_lambdas: tuple = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    aligned_group_size: int = 32  # the embedded model's Q4_1 blocks: RTN and GPTQ at this group size too (0: off)
    calib_tokens: int = 8192
    calib_lengths: tuple = (128, 512, 1024, 2048)
    eval_lengths: tuple = (128, 512, 2048)
    eval_tokens: int = 2048  # per text and evaluation length (fixed windows: comparisons are paired)
    holdout_fraction: float = 0.1


# What a run depends on (a run made with the same values is reused whatever the grid); the rest is the grid.
RUN_FIELDS = ("group_size", "calib_tokens", "calib_lengths", "eval_lengths", "eval_tokens", "holdout_fraction")
MAX_LAMBDA = 1024.0  # H + λ·diag(H) tends to RTN as λ grows: an optimum still at the top here is reported as such


def plan(cfg: StudyConfig, runs=()) -> list[Cell]:
    """Every cell, most informative first (so an interrupted study has the main comparison): FP and RTN;
    GPTQ / GPTAQ fixed vs MaCa on the first seed; GPTQ's other seeds and ablations; GPTQ's λ sweep; the
    aligned group size; GPTAQ's λ sweep and other seeds (a GPTAQ run costs about twice a GPTQ run). The sweeps
    depend on the finished ``runs``: the grid grows while its best λ sits at its top, and the other seeds run at
    the λ chosen once the first seed's sweep is complete."""
    done = {r["key"]: r for r in runs}
    cells = [Cell(0, "fp")] + [Cell(b, "rtn") for b in cfg.bits]
    first, rest = cfg.seeds[0], cfg.seeds[1:]
    for method in ("gptq", "gptaq"):
        cells += [Cell(b, method, s, seed=first) for b in cfg.bits for s in ("fixed", "maca")]
    cells += [Cell(b, "gptq", s, seed=seed) for seed in rest for b in cfg.bits for s in ("fixed", "maca")]
    cells += [Cell(b, "gptq", "mix-token", seed=seed) for seed in cfg.seeds for b in cfg.bits]
    cells += [Cell(b, "gptq", "fixed-seq", seed=first) for b in cfg.bits]  # same H up to scale as "fixed"
    for b in cfg.bits:
        for s in ("fixed", "maca"):
            cells += _sweep(Cell(b, "gptq", s, seed=first), cfg.lambdas, rest, done)
    ag = cfg.aligned_group_size
    if ag and ag != cfg.group_size:
        for g in (cfg.group_size, ag):  # the study's group size keyed explicitly: these runs record weight errors
            cells += [Cell(b, "rtn", group_size=g) for b in cfg.bits]
            cells += [Cell(b, "gptq", s, seed=first, group_size=g) for b in cfg.bits for s in ("fixed", "maca")]
    for b in cfg.bits:
        for s in ("fixed", "maca"):
            cells += _sweep(Cell(b, "gptaq", s, seed=first), cfg.gptaq_lambdas, rest, done)
    cells += [Cell(b, "gptaq", s, seed=seed) for seed in rest for b in cfg.bits for s in ("fixed", "maca")]
    out, seen = [], set()
    for c in cells:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def _sweep(base: Cell, grid, rest, done: dict) -> list[Cell]:
    at, best = _swept(base, grid, done)
    return at if best is None else at + [replace(best, seed=seed) for seed in rest]


def _swept(base: Cell, grid, done: dict) -> tuple[list[Cell], Cell | None]:
    """The first seed's cells of a sweep (grown while its best λ sits at the top) and the best one, or None while
    a cell of the sweep has no run yet."""
    at = [replace(base, reg=lam) for lam in sorted(set(grid))]
    while True:
        scores = [val_score(done[c.key]) if c.key in done else None for c in at]
        if None in scores or len(at) < 2:
            return at, None
        best = at[scores.index(min(scores))]
        if best is not at[-1] or best.reg == 0 or best.reg * 2 > MAX_LAMBDA:
            return at, best
        at.append(replace(base, reg=best.reg * 2))  # at the top of the grid: not an optimum yet


def val_score(run: dict) -> float:
    """What λ is chosen by: the mean log-perplexity on the in-domain validation text over evaluation lengths."""
    return statistics.mean(math.log(v) for v in run["perplexity"]["jargon_val"].values())


@dataclass
class Texts:
    calib: torch.Tensor  # the calibration stream (windows are drawn only from here)
    jargon_val: torch.Tensor
    jargon_test: torch.Tensor
    bible: torch.Tensor
    layout: dict  # where each part sits in the Jargon File's token stream (for the report)


def split_texts(jargon: torch.Tensor, bible: torch.Tensor, holdout_fraction: float) -> Texts:
    calib_ids, held = calibration.holdout_split(jargon, eval_fraction=holdout_fraction)
    half = held.numel() // 2
    n = calib_ids.numel()
    layout = {"jargon_tokens": jargon.numel(), "calib": [0, n], "jargon_val": [n, n + half],
              "jargon_test": [n + half, jargon.numel()], "bible_tokens": bible.numel()}
    return Texts(calib_ids, held[:half], held[half:], bible, layout)


def calibration_for(cell: Cell, texts: Texts, cfg: StudyConfig, max_positions: int | None):
    sampler, _ = SCHEMES[cell.scheme]
    if sampler == "fixed":
        return calibration.fixed(texts.calib, max(cfg.calib_lengths), total_tokens=cfg.calib_tokens,
                                 seed=cell.seed, max_positions=max_positions)
    return calibration.matryoshka(texts.calib, cfg.calib_lengths, total_tokens=cfg.calib_tokens, seed=cell.seed,
                                  max_positions=max_positions)


def check_bookkeeping(calib, texts: Texts, cfg: StudyConfig) -> dict:
    """The study's promises for one calibration set, checked rather than assumed: windows inside the
    calibration stream (so never on evaluation text) and exactly the token budget."""
    ends = calib.starts + calib.lengths
    if calib.source_tokens != texts.calib.numel() or int(ends.max()) > texts.calib.numel():
        raise RuntimeError("a calibration window reaches past the calibration stream into evaluation text")
    if calib.total_tokens != cfg.calib_tokens:
        raise RuntimeError(f"calibration has {calib.total_tokens} tokens, the budget is {cfg.calib_tokens}")
    return {"windows_end_before_token": int(ends.max()), "calib_stream_tokens": texts.calib.numel(),
            "total_tokens": calib.total_tokens}


def run_cell(cell: Cell, fp_model, texts: Texts, cfg: StudyConfig, *, calib_shards: int = 1,
             codes: dict | None = None, code: str | None = None) -> dict:
    """One run: quantize a copy of ``fp_model`` as ``cell`` says and evaluate it. ``calib_shards``: the Hessians'
    summation order (1, the published runs'); ``codes``: if given, filled with each module's codes; ``code``: the
    commit to record (default: the work tree's now; a long study passes the one it started with)."""
    from .pipeline import quantize_model

    t0 = time.perf_counter()
    model = fp_model if cell.method == "fp" else copy.deepcopy(fp_model)
    entry: dict = {"cell": asdict(cell), "key": cell.key}
    max_pos = getattr(fp_model.config, "max_position_embeddings", None)
    gs = cell.group_size or cfg.group_size
    err = [0.0, 0.0]  # Σ‖W − Q‖², Σ‖W‖² over the quantized matrices

    def weight_error(name, H, r):
        w = fp_model.get_submodule(name).weight.detach().double()
        err[0] += float((w - r.weight.double()).square().sum())
        err[1] += float(w.square().sum())
        if codes is not None:
            codes[name] = r.codes.to(torch.uint8)

    if cell.method == "rtn":
        quantize_model(model, None, cell.bits, gs, method="rtn", progress=False, log=None, callback=weight_error)
    elif cell.method in ("gptq", "gptaq"):
        calib = calibration_for(cell, texts, cfg, max_pos)
        entry["calibration"] = calib.describe() | {"checks": check_bookkeeping(calib, texts, cfg)}
        # one calibration shard: the summation order of the published runs (study/runs/), which 8 shards would
        # change in the last bits and, through GPTQ's rounding, perplexities by several percent (README)
        quantize_model(model, calib, cell.bits, gs, method=cell.method, weighting=SCHEMES[cell.scheme][1],
                       reg=cell.reg or None, calib_shards=calib_shards, progress=False, log=None,
                       callback=weight_error)
    if err[1]:
        entry["weight_error"] = math.sqrt(err[0] / err[1])  # relative Frobenius error of the quantized weights
    entry["quantize_s"] = round(time.perf_counter() - t0, 2)
    entry["code"] = code or _code_version()  # GPTQ's codes move with any change of fp32 rounding: compare within one
    if getattr(model, "quantize_stats", None) is not None:
        entry["time_split"] = model.quantize_stats.summary()
    t1 = time.perf_counter()
    entry["perplexity"] = {name: {str(L): perplexity(model, getattr(texts, name), L, max_tokens=cfg.eval_tokens)
                                  for L in cfg.eval_lengths} for name in TEXTS}
    entry["eval_s"] = round(time.perf_counter() - t1, 2)
    return entry


def run_study(out_dir: str = "study", cfg: StudyConfig | None = None, *, load=None, max_runs: int | None = None,
              rerun: tuple[str, ...] = (), log=print) -> dict:
    """Run the cells of ``plan(cfg)`` not yet in ``<out_dir>/runs/`` (at most ``max_runs`` of them), then
    summarize. ``load()`` → (fp_model, jargon_ids, bible_ids, meta); default: the embedded model and texts.

    ``rerun``: key patterns (fnmatch, e.g. ``"*-reg0.5-s*"``): the finished runs they match that were made with
    other code than this commit (their ``code`` differs, or is missing) count as not done, so that the cells one
    table compares come from one commit (GPTQ's codes, and so its perplexities by several percent, move with any
    change of fp32 rounding: ``sensitivity``). The plan's cells run first, in its order (a stale run the plan
    no longer holds, e.g. a seed at a λ not chosen, is rerun after them). Each rerun replaces its file when it
    finishes; an interrupted rerun resumes, and until it has finished the summary leaves the stale runs out."""
    cfg = cfg or StudyConfig()
    code = _code_version()
    if rerun and not re.fullmatch(r"[0-9a-f]{7,40}", code):
        raise RuntimeError(f"rerun: the package's code is {code!r}, not a clean git commit, so the new runs could not "
                           "name the code they were made with; commit first (or run from a clean worktree)")
    fp_model, jargon, bible, meta = (load or _load_embedded)()
    texts = split_texts(jargon, bible, cfg.holdout_fraction)
    runs_dir = os.path.join(out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    cfg_path = os.path.join(out_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if _run_fields(json.load(f)["config"]) != _run_fields(_config_record(cfg)):
                raise RuntimeError(f"{out_dir} holds a study made with another study configuration; resume with "
                                   f"the same {', '.join(RUN_FIELDS)}, or start in another --out folder")
    _write_json(cfg_path,
                {"config": _config_record(cfg), "meta": meta, "text_layout": texts.layout,
                 "torch": torch.__version__, "threads": torch.get_num_threads()})
    if rerun:
        found = _valid_runs(out_dir, cfg)
        for p in rerun:
            n = sum(_stale(r, (p,), code) for r in found)
            log(f"rerun {p!r}: {n} of the {sum(fnmatch.fnmatchcase(r['key'], p) for r in found)} runs it matches "
                f"were made with other code than {code}")
    done = 0
    while max_runs is None or done < max_runs:
        runs, stale = [], []
        for r in _valid_runs(out_dir, cfg):
            (stale if _stale(r, rerun, code) else runs).append(r)
        have = {r["key"] for r in runs}
        todo = [c for c in plan(cfg, runs) if c.key not in have]  # the plan grows with the sweeps' results
        todo += [c for c in map(_cell, stale) if c not in todo]
        if not todo:
            break
        cell = todo[0]
        entry = run_cell(cell, fp_model, texts, cfg, code=code) | {"config": _config_record(cfg)}
        _write_json(os.path.join(runs_dir, cell.key + ".json"), entry)  # as soon as it finishes: a rerun resumes
        done += 1
        ppl = entry["perplexity"]
        log(f"{cell.key}: quantize {entry['quantize_s']} s, eval {entry['eval_s']} s, "
            + ", ".join(f"{t}@{L} {v:.2f}" for t in ("jargon_test", "bible") for L, v in ppl[t].items()))
    return summarize(out_dir, log=log, leave_out=lambda r: _stale(r, rerun, code))


def _stale(run: dict, patterns, code: str) -> bool:
    return run.get("code") != code and any(fnmatch.fnmatchcase(run["key"], p) for p in patterns)


def sensitivity(out_dir: str = "study", cells=((4, 0.0), (4, 2.0), (3, 0.0), (3, 0.5)), orders=(1, 4), *,
                cfg: StudyConfig | None = None, load=None, log=print) -> dict:
    """How far a GPTQ run moves when nothing changes but the fp32 summation order of its Hessians: the study's
    fixed-length cell at seed 0 for each (bits, λ) in ``cells``, quantized twice, with the two calibration shard
    counts in ``orders`` (partial sums reduced in float64: the same sum, other last bits; a shard holds at least
    one sequence, so the effective count, recorded, is at most the cell's 4 windows). Per cell: each run's
    perplexities and weight error, and the fraction of codes that differ, overall and per layer. Written to
    ``<out_dir>/sensitivity.json`` after each cell; a cell already there with this commit and settings is kept."""
    cfg = cfg or StudyConfig()
    if len(orders) != 2 or orders[0] == orders[1]:
        raise ValueError(f"orders must be two different shard counts, got {orders!r}")
    code = _code_version()
    fp_model, jargon, bible, _ = (load or _load_embedded)()
    texts = split_texts(jargon, bible, cfg.holdout_fraction)
    path = os.path.join(out_dir, "sensitivity.json")
    settings = {"orders": list(orders), "config": _config_record(cfg)}
    kept = {}  # every cell already there stays in the file; one is reused only at this clean commit and settings
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)["cells"]
    done = {}
    for bits, reg in cells:
        cell = Cell(bits, "gptq", "fixed", reg=reg, seed=cfg.seeds[0])
        old = kept.get(cell.key)
        if old is not None and old["code"] == code and not code.endswith("+changes") and \
                {k: old.get(k) for k in settings} == settings:
            done[cell.key] = old
            continue
        runs, codes = {}, []
        for n in orders:
            codes.append({})
            e = run_cell(cell, fp_model, texts, cfg, calib_shards=n, codes=codes[-1], code=code)
            runs[str(n)] = {"effective_shards": min(n, e["calibration"]["n_sequences"])} | {
                k: e[k] for k in ("perplexity", "weight_error", "quantize_s")}
        layers: dict[str, list[int]] = {}
        for name, a in codes[0].items():
            m = re.match(r"(.*?\.\d+)\.", name + ".")  # model.layers.<i>
            diff = layers.setdefault(m.group(1) if m else name, [0, 0])
            diff[0] += int((a != codes[1][name]).sum())
            diff[1] += a.numel()
        changed = sum(d for d, _ in layers.values()) / sum(n for _, n in layers.values())
        done[cell.key] = {"code": code, **settings, "runs": runs, "codes_changed": changed,
                          "codes_changed_by_layer": {k: d / n for k, (d, n) in layers.items()}}
        _write_json(path, {"what": "GPTQ runs that differ only in the fp32 summation order of their Hessians "
                                   "(calibration shards reduced in float64)", "cells": kept | done})
        ppl = [runs[str(n)]["perplexity"]["jargon_test"][str(cfg.eval_lengths[0])] for n in orders]
        log(f"{cell.key}: codes changed {changed:.2%}, jargon_test@{cfg.eval_lengths[0]} "
            + " vs ".join(f"{p:.2f}" for p in ppl))
    return done


def _code_version() -> str:
    """The commit the run was made with (with "+changes" when the work tree differs), or the package version."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/maca_kernels", ":/csrc", ":/python"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from . import __version__

        return __version__


def _run_fields(record: dict) -> dict:
    return {k: record.get(k) for k in RUN_FIELDS}


def _valid_runs(out_dir: str, cfg: StudyConfig) -> list[dict]:
    """The finished runs, each checked to be made with this study's run fields (a grid may differ)."""
    runs = load_runs(out_dir)
    for r in runs:
        if _run_fields(r.get("config") or {}) != _run_fields(_config_record(cfg)):
            raise RuntimeError(f"{out_dir}/runs/{r['key']}.json was made with another study configuration "
                               f"({r.get('config')}); resume with the same {', '.join(RUN_FIELDS)}, or start in "
                               "another --out folder")
    return runs


def _config_record(cfg: StudyConfig) -> dict:
    """The configuration as JSON reads it back (tuples become lists), stored in every run."""
    return json.loads(json.dumps(asdict(cfg)))


def grid_blocks(model, block: int = 32, levels: int = 16) -> dict:
    """How many ``block``-column blocks of the decoder layers' Linear weights hold their values on one grid of at
    most ``levels`` equally spaced values (what a Q4_1 origin leaves), for blocks aligned at column 0 and, as a
    control, shifted by half a block. Returns the fractions (float32 weights; a step is "equal" within 1e-3)."""
    out = {}
    for shift in (0, block // 2):
        hit = total = 0
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear) or ".layers." not in name:
                continue
            w = m.weight.detach().float()
            K = (w.shape[1] - shift) // block * block
            b = w[:, shift:shift + K].reshape(-1, block).sort(dim=1).values
            lo, hi = b[:, :1], b[:, -1:]
            step = (hi - lo) / (levels - 1)
            q = (b - lo) / step.clamp_min(1e-30)
            on = ((q - q.round()).abs() < 1e-3).all(dim=1) | (hi == lo).squeeze(1)
            hit += int(on.sum())
            total += on.numel()
        out["aligned" if shift == 0 else f"shifted_by_{shift}"] = hit / total
    return out


def _load_embedded():
    from . import embedded

    embedded.ensure_all(install=True)
    fp_model, tok = embedded.load_model()
    jargon = calibration.load_token_ids(text=embedded.jargon_text(), tokenizer=tok)
    bible = calibration.load_token_ids(text=embedded.bible_text()[:400_000], tokenizer=tok)  # ~100k tokens
    meta = {"model": "SmolLM2-135M-Instruct (embedded default)", "model_note": embedded.MODEL_NOTE,
            "weights_on_a_4bit_grid_of_32_columns": grid_blocks(fp_model),
            "calibration_text": "Jargon File (Debian jargon-text)",
            "out_of_domain_text": "King James Bible (bible-kjv)"}
    return fp_model, jargon, bible, meta


# ------------------------------------------------------------------------------------------- summary


def load_runs(out_dir: str) -> list[dict]:
    runs_dir = os.path.join(out_dir, "runs")
    runs = []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(runs_dir, name)) as f:
                runs.append(json.load(f))
    return runs


def _cell(run: dict) -> Cell:
    return Cell(**run["cell"])


def aggregate(runs: list[dict]) -> dict:
    """{group: {"n": seeds, "cell": first cell, text: {L: (mean, std)}}} over the seeds of each cell."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(_cell(r).group, []).append(r)
    out = {}
    for g, rs in groups.items():
        entry = {"n": len(rs), "cell": rs[0]["cell"], "quantize_s": statistics.mean(r["quantize_s"] for r in rs),
                 "eval_s": statistics.mean(r["eval_s"] for r in rs),
                 "code": sorted({r.get("code") or "unrecorded" for r in rs})}  # the commits its runs were made at
        errs = [r["weight_error"] for r in rs if "weight_error" in r]
        if errs:
            entry["weight_error"] = statistics.mean(errs)
        for t in TEXTS:
            entry[t] = {}
            for L in rs[0]["perplexity"][t]:
                vals = [r["perplexity"][t][L] for r in rs]
                entry[t][L] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out[g] = entry
    return out


def choose_lambda(runs: list[dict], cfg: StudyConfig) -> dict:
    """For each (bits, method, scheme) whose first-seed λ sweep is finished: the λ with the lowest ``val_score``
    at the first seed (the in-domain validation text, nothing else: not the test half, not the Bible), the grid
    it was chosen from, and whether it is an optimum inside the grid ("interior") or sits at λ = 0 (no
    regularisation helps) or at the top (``MAX_LAMBDA`` reached)."""
    done = {r["key"]: r for r in runs}
    out = {}
    for method, grid in (("gptq", cfg.lambdas), ("gptaq", cfg.gptaq_lambdas)):
        for b in cfg.bits:
            for scheme in ("fixed", "maca"):
                at, best = _swept(Cell(b, method, scheme, seed=cfg.seeds[0]), grid, done)
                if best is None:
                    continue
                where = "zero" if best.reg == 0 else ("top" if best is at[-1] else "interior")
                out[best.base] = {"reg": best.reg, "group": best.group, "val_score": val_score(done[best.key]),
                                  "grid": [c.reg for c in at], "where": where}
    return out


def summarize(out_dir: str, log=print, leave_out=None) -> dict:
    """Tables and plots from the runs made with ``<out_dir>/config.json``'s run fields (others are left out and
    counted), less those ``leave_out(run)`` names (a rerun's stale runs still waiting: counted as such)."""
    with open(os.path.join(out_dir, "config.json")) as f:
        record = json.load(f)["config"]
    names = {f.name for f in fields(StudyConfig)}
    cfg = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})
    found = load_runs(out_dir)
    runs, pending = [], []
    for r in found:
        if _run_fields(r.get("config") or {}) == _run_fields(record):
            (pending if leave_out is not None and leave_out(r) else runs).append(r)
    if not runs:
        raise RuntimeError(f"no finished runs of this configuration in {out_dir}/runs")
    agg = aggregate(runs)
    lam = choose_lambda(runs, cfg)
    keys = {c.key for c in plan(cfg, runs)}
    summary = {"groups": agg, "lambda_choice": lam, "runs": len(runs),
               "planned_left": len(keys - {r["key"] for r in runs}), "rerun_pending": len(pending),
               "left_out": len(found) - len(runs) - len(pending),
               "wall_s": round(sum(r["quantize_s"] + r["eval_s"] for r in runs), 1)}
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    table = markdown_table(agg, lam)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    _plots(agg, lam, out_dir)
    log(table)
    return summary


def _fmt(ms) -> str:
    m, s = ms
    return f"{m:.2f} ± {s:.2f}" if s else f"{m:.2f}"


def markdown_table(agg: dict, lam: dict) -> str:
    any_entry = next(iter(agg.values()))
    lengths = list(any_entry["jargon_test"])
    head = ("| cell | seeds | " + " | ".join(f"{t} @{L}" for t in ("jargon_test", "bible") for L in lengths)
            + " | weight err | quantize s | eval s | code |")
    rows = [head, "|" + " --- |" * (6 + 2 * len(lengths))]
    chosen = {v["group"]: v["where"] for v in lam.values()}
    marks = {"interior": " (λ chosen)", "zero": " (λ chosen: 0)", "top": " (λ chosen at the grid's top)"}

    def order(g):
        c = agg[g]["cell"]
        return (c["method"] != "fp", -c["bits"], c.get("group_size", 0), ["fp", "rtn", "gptq", "gptaq"].index(
            c["method"]), c["scheme"], c["reg"])

    for g in sorted(agg, key=order):
        e = agg[g]
        cells = [_fmt(e[t][L]) for t in ("jargon_test", "bible") for L in lengths]
        err = f"{e['weight_error']:.4f}" if "weight_error" in e else ""
        rows.append(f"| {g}{marks.get(chosen.get(g), '')} | {e['n']} | " + " | ".join(cells)
                    + f" | {err} | {e['quantize_s']:.0f} | {e['eval_s']:.0f} | {', '.join(e.get('code', ()))} |")
    return "\n".join(rows)


COLORS = {"fp": "black", "rtn": "gray", "gptq-fixed": "tab:blue", "gptq-maca": "tab:orange",
          "gptaq-fixed": "tab:green", "gptaq-maca": "tab:red"}


def _plots(agg: dict, lam: dict, out_dir: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    bits = sorted({e["cell"]["bits"] for e in agg.values() if e["cell"]["bits"]}, reverse=True)
    if not bits:  # only the float model has run yet
        return
    fig, axes = plt.subplots(2, len(bits), figsize=(5 * len(bits), 8), squeeze=False)
    for j, b in enumerate(bits):
        for i, text in enumerate(("jargon_test", "bible")):
            ax = axes[i][j]
            for g, e in sorted(agg.items()):
                c = e["cell"]
                shown = (c["bits"] == b and c["reg"] == 0 and c["scheme"] in ("-", "fixed", "maca")
                         and not c.get("group_size"))
                if not (c["method"] == "fp" or shown):
                    continue
                pts = sorted((int(L), m, s) for L, (m, s) in e[text].items())
                label = g.replace(f"{b}b-", "").replace("-reg0", "")
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=label, color=COLORS.get(label))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("evaluation length (tokens)")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{b}-bit, {text}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "perplexity.png"), dpi=90)
    plt.close(fig)
    sweeps = {}
    for e in agg.values():
        c = e["cell"]
        if c["method"] in ("gptq", "gptaq") and c["scheme"] in ("fixed", "maca") and not c.get("group_size"):
            sweeps.setdefault((c["bits"], f"{c['method']} {c['scheme']}"), []).append((c["reg"], e))
    sweeps = {k: sorted(v, key=lambda t: t[0]) for k, v in sweeps.items() if len(v) > 1}
    if not sweeps:
        return
    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 4), squeeze=False)
    for j, b in enumerate(bits):
        ax = axes[0][j]
        for (bb, scheme), pts in sorted(sweeps.items()):
            if bb != b:
                continue
            for text, style in (("jargon_val", ":"), ("bible", "--")):
                L = max(pts[0][1][text], key=int)
                ax.plot([max(r, 1e-3) for r, _ in pts], [e[text][L][0] for _, e in pts], style, marker="o",
                        label=f"{scheme} {text}@{L}")
        ax.set_xscale("log")
        ax.set_xlabel("λ (0 drawn at 1e-3)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{b}-bit, λ sweep (seed 0; means where 3 seeds ran)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lambda.png"), dpi=90)
    plt.close(fig)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


__all__ = ["Cell", "StudyConfig", "choose_lambda", "plan", "run_study", "summarize"]
