"""The study's bookkeeping on a tiny model: calibration never touches evaluation text, equal token budgets,
λ chosen on in-domain validation text only, resumable one-file-per-run output, the table and plots."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

from maca_kernels import calibration, study  # noqa: E402
from maca_kernels.cli import main  # noqa: E402

CFG = study.StudyConfig(bits=(4,), group_size=32, seeds=(0, 1), lambdas=(0.0, 0.5), gptaq_lambdas=(0.0, 0.5),
                        aligned_group_size=16, calib_tokens=256, calib_lengths=(16, 32, 64), eval_lengths=(16, 64),
                        eval_tokens=128)


def loader():
    g = torch.Generator().manual_seed(0)
    jargon = torch.randint(0, 96, (4000,), generator=g)
    bible = torch.randint(0, 96, (1000,), generator=g)
    return tiny_model(seed=0), jargon, bible, {"model": "tiny"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    top, study.MAX_LAMBDA = study.MAX_LAMBDA, 2.0  # a sweep grows at most to λ = 2 here
    try:
        study.run_study(out, CFG, load=loader, log=lambda *_: None)
    finally:
        study.MAX_LAMBDA = top
    return out


def test_plan_covers_the_grid_once():
    cells = study.plan(CFG)
    keys = [c.key for c in cells]
    # fp, RTN; GPTQ/GPTAQ × fixed/MaCa at seed 0; GPTQ's seed 1; mix-token × 2 seeds; fixed-seq; GPTQ λ = 0.5 ×
    # 2 schemes; RTN and GPTQ fixed/MaCa at g32 and g16; GPTAQ λ = 0.5 × 2 schemes; GPTAQ's seed 1
    assert len(keys) == len(set(keys)) == 1 + 1 + 4 + 2 + 2 + 1 + 2 + 2 * 3 + 2 + 2
    assert keys[:2] == ["fp", "4b-rtn"]
    assert {c.seed for c in cells if c.method == "gptaq"} == {0, 1}
    assert {c.reg for c in cells if c.scheme == "maca"} == {0.0, 0.5}
    assert {c.key for c in cells if c.group_size} == {"4b-rtn-g32", "4b-rtn-g16", "4b-gptq-fixed-reg0-g32-s0",
                                                      "4b-gptq-maca-reg0-g32-s0", "4b-gptq-fixed-reg0-g16-s0",
                                                      "4b-gptq-maca-reg0-g16-s0"}


def fake_run(cell, val):
    return {"key": cell.key, "cell": study.asdict(cell), "perplexity": {"jargon_val": {"16": val, "64": val}}}


def test_a_sweep_grows_while_its_best_is_at_the_top_then_runs_every_seed_there():
    cfg = study.StudyConfig(bits=(4,), seeds=(0, 1, 2), lambdas=(0.0, 1.0, 2.0), gptaq_lambdas=(0.0,),
                            aligned_group_size=0)
    base = study.Cell(4, "gptq", "maca")

    def planned(vals):
        runs = [fake_run(study.replace(base, reg=lam), v) for lam, v in vals.items()]
        return {c.key for c in study.plan(cfg, runs) if c.scheme == "maca" and c.method == "gptq"}, \
            study.choose_lambda(runs, cfg).get("4b-gptq-maca")

    keys, choice = planned({0.0: 9, 1.0: 8})  # λ = 2 not run yet: nothing chosen, no other seed
    assert "4b-gptq-maca-reg2-s0" in keys and not any("-reg2-s1" in k or "-reg1-s1" in k for k in keys)
    assert choice is None
    keys, choice = planned({0.0: 9, 1.0: 8, 2.0: 7})  # best at the top: λ = 4 next, still no choice
    assert "4b-gptq-maca-reg4-s0" in keys and choice is None
    keys, choice = planned({0.0: 9, 1.0: 8, 2.0: 7, 4.0: 7.5})  # interior now: every seed at λ = 2
    assert {"4b-gptq-maca-reg2-s1", "4b-gptq-maca-reg2-s2"} <= keys and "4b-gptq-maca-reg8-s0" not in keys
    assert choice == {"reg": 2.0, "group": "4b-gptq-maca-reg2", "val_score": math.log(7), "grid": [0, 1, 2, 4],
                      "where": "interior"}
    keys, choice = planned({0.0: 6, 1.0: 8, 2.0: 7})  # no regularisation is best: said so
    assert choice["where"] == "zero" and "4b-gptq-maca-reg4-s0" not in keys
    top, study.MAX_LAMBDA = study.MAX_LAMBDA, 4.0
    try:
        _, choice = planned({0.0: 9, 1.0: 8, 2.0: 7, 4.0: 6})  # the cap reached: reported as the top
    finally:
        study.MAX_LAMBDA = top
    assert choice["where"] == "top" and choice["reg"] == 4.0


def test_every_run_is_one_file_and_calibration_stays_off_evaluation_text(finished):
    runs = study.load_runs(finished)
    assert sorted(r["key"] for r in runs) == sorted(c.key for c in study.plan(CFG, runs))
    assert all(0 < r["weight_error"] < 1 for r in runs if r["cell"]["method"] != "fp")
    assert all(isinstance(r["code"], str) and r["code"] for r in runs)  # the commit (or version) it ran at
    layout = json.loads(Path(finished, "config.json").read_text())["text_layout"]
    assert layout["calib"][1] == layout["jargon_val"][0] and layout["jargon_val"][1] == layout["jargon_test"][0]
    for r in runs:
        if r["cell"]["method"] in ("gptq", "gptaq"):
            checks = r["calibration"]["checks"]
            assert checks["windows_end_before_token"] <= layout["calib"][1]  # no window reaches held-out text
            assert r["calibration"]["total_tokens"] == CFG.calib_tokens  # the same budget everywhere
        assert set(r["perplexity"]) == set(study.TEXTS)
        assert all(v > 1 for t in r["perplexity"].values() for v in t.values())
        assert r["quantize_s"] >= 0 and r["eval_s"] >= 0


def test_check_bookkeeping_refuses_a_window_on_evaluation_text():
    jargon = torch.arange(1000) % 96
    texts = study.split_texts(jargon, jargon[:100], 0.2)
    ok = calibration.fixed(texts.calib, 64, total_tokens=256, seed=0)
    study.check_bookkeeping(ok, texts, CFG)
    leaky = calibration.fixed(jargon, 64, total_tokens=256, seed=0)  # drawn from the whole stream
    with pytest.raises(RuntimeError, match="into evaluation text"):
        study.check_bookkeeping(leaky, texts, CFG)
    with pytest.raises(RuntimeError, match="the budget is 512"):
        study.check_bookkeeping(ok, texts, study.StudyConfig(calib_tokens=512))


def test_rerun_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    calls = []
    run_cell = study.run_cell
    monkeypatch.setattr(study, "run_cell", lambda cell, *a, **k: calls.append(cell.key) or run_cell(cell, *a, **k))
    study.run_study(str(tmp_path), CFG, load=loader, max_runs=3, log=lambda *_: None)
    first = sorted(os.listdir(tmp_path / "runs"))
    assert len(calls) == 3 and len(first) == 3
    stamps = {f: os.path.getmtime(tmp_path / "runs" / f) for f in first}
    study.run_study(str(tmp_path), CFG, load=loader, max_runs=2, log=lambda *_: None)
    assert len(calls) == 5 and calls[:3] != calls[3:]
    assert all(os.path.getmtime(tmp_path / "runs" / f) == t for f, t in stamps.items())


def test_rerun_replaces_only_matching_runs_made_with_other_code(tmp_path, monkeypatch):
    calls = []
    run_cell = study.run_cell
    monkeypatch.setattr(study, "run_cell", lambda cell, *a, **k: calls.append(cell.key) or run_cell(cell, *a, **k))
    monkeypatch.setattr(study, "_code_version", lambda: "aaaaaaa")
    out = str(tmp_path)
    study.run_study(out, CFG, load=loader, max_runs=4, log=lambda *_: None)  # fp, RTN, GPTQ fixed and MaCa
    code = {f: json.loads((tmp_path / "runs" / f"{f}.json").read_text())["code"] for f in ("fp", "4b-rtn")}
    assert code == {"fp": "aaaaaaa", "4b-rtn": "aaaaaaa"}
    logged = []
    study.run_study(out, CFG, load=loader, max_runs=1, rerun=("4b-*",), log=logged.append)
    assert calls[4:] == ["4b-gptaq-fixed-reg0-s0"]  # same code: nothing rerun, the next planned cell runs
    assert logged[0] == "rerun '4b-*': 0 of the 3 runs it matches were made with other code than aaaaaaa"
    # the commit moves while the study runs: every run records the one it started with, and it ends
    versions = iter(f"{i:07x}" for i in range(11, 10**6))
    monkeypatch.setattr(study, "_code_version", lambda: next(versions))
    gone = tmp_path / "runs" / "4b-gptq-maca-reg0-s0.json"
    record = json.loads(gone.read_text())
    del record["code"]  # made before runs recorded their commit: stale for any pattern that matches it
    gone.write_text(json.dumps(record))
    summary = study.run_study(out, CFG, load=loader, max_runs=3, rerun=("4b-rtn", "*-maca-*"), log=logged.append)
    assert calls[5:] == ["4b-rtn", "4b-gptq-maca-reg0-s0", "4b-gptaq-maca-reg0-s0"]  # in plan order, then new
    runs = {r["key"]: r["code"] for r in study.load_runs(out)}
    assert runs["4b-rtn"] == runs["4b-gptq-maca-reg0-s0"] == "000000b" and runs["fp"] == "aaaaaaa"
    assert runs["4b-gptq-fixed-reg0-s0"] == "aaaaaaa"  # not matched: kept
    assert summary["rerun_pending"] == 0
    monkeypatch.setattr(study, "_code_version", lambda: "ccccccc")
    summary = study.run_study(out, CFG, load=loader, max_runs=1, rerun=("4b-gptq-*",), log=logged.append)
    assert calls[8:] == ["4b-gptq-fixed-reg0-s0"] and summary["rerun_pending"] == 1  # MaCa's waits: left out
    for code in ("bbbbbbb+changes", "0.3.0"):  # no clean commit to record
        monkeypatch.setattr(study, "_code_version", lambda code=code: code)
        with pytest.raises(RuntimeError, match="not a clean git commit"):
            study.run_study(out, CFG, load=loader, rerun=("*",), log=lambda *_: None)
    assert main(["study", "--out", out, "--summarize-only", "--rerun", "*"]) == 2


def test_a_stale_run_outside_the_plan_is_rerun_after_it(tmp_path, monkeypatch):
    out = str(tmp_path)
    monkeypatch.setattr(study, "_code_version", lambda: "aaaaaaa")
    study.run_study(out, CFG, load=loader, max_runs=1, log=lambda *_: None)  # fp
    extra = study.Cell(4, "gptq", "fixed", reg=0.05, seed=1)  # a seed at a λ the plan does not hold
    assert extra not in study.plan(CFG, study.load_runs(out))
    fp_model, jargon, bible, _ = loader()
    texts = study.split_texts(jargon, bible, CFG.holdout_fraction)
    entry = study.run_cell(extra, fp_model, texts, CFG) | {"config": study._config_record(CFG)}
    study._write_json(str(tmp_path / "runs" / f"{extra.key}.json"), entry)
    monkeypatch.setattr(study, "_code_version", lambda: "bbbbbbb")
    order = []
    monkeypatch.setattr(study, "run_cell", lambda cell, *a, code, **k: order.append(cell.key) or dict(
        entry, key=cell.key, cell=study.asdict(cell), code=code))  # the real run's numbers, under each key
    study.run_study(out, CFG, load=loader, rerun=("*-reg0.05-*",), log=lambda *_: None)
    assert order[-1] == extra.key and order.count(extra.key) == 1 and len(order) > 1


def test_sensitivity_compares_runs_that_differ_only_in_summation_order(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(study, "_code_version", lambda: "aaaaaaa")
    done = study.sensitivity(str(tmp_path), cells=((4, 0.0),), orders=(1, 3), cfg=CFG, load=loader,
                             log=logged.append)
    e = done["4b-gptq-fixed-reg0-s0"]
    assert list(e["codes_changed_by_layer"]) == [f"model.layers.{i}" for i in range(2)]
    assert 0 <= e["codes_changed"] <= 1 and e["code"] == "aaaaaaa" and e["orders"] == [1, 3]
    n_seq = CFG.calib_tokens // max(CFG.calib_lengths)
    assert [r["effective_shards"] for r in e["runs"].values()] == [1, min(3, n_seq)]
    assert e["runs"]["1"]["perplexity"] == study.run_cell(study.Cell(4, "gptq", "fixed"), *_fp_and_texts())[
        "perplexity"]  # the study's own run of that cell
    same = study.sensitivity(str(tmp_path), cells=((4, 0.0),), orders=(1, 3), cfg=CFG, load=loader,
                             log=logged.append)
    assert same["4b-gptq-fixed-reg0-s0"] == e and len(logged) == 1  # kept: same commit and settings
    other = study.sensitivity(str(tmp_path), cells=((4, 0.0),), orders=(1, 2), cfg=CFG, load=loader,
                              log=logged.append)
    assert other["4b-gptq-fixed-reg0-s0"]["orders"] == [1, 2] and len(logged) == 2  # other settings: run again
    stored = json.loads((tmp_path / "sensitivity.json").read_text())["cells"]
    assert stored == other
    monkeypatch.setattr(study, "_code_version", lambda: "aaaaaaa+changes")  # a dirty tree: nothing reused ...
    dirty = study.sensitivity(str(tmp_path), cells=((4, 0.5),), orders=(1, 2), cfg=CFG, load=loader,
                              log=logged.append)
    assert len(logged) == 3 and dirty["4b-gptq-fixed-reg0.5-s0"]["code"] == "aaaaaaa+changes"
    stored = json.loads((tmp_path / "sensitivity.json").read_text())["cells"]
    assert stored == other | dirty  # ... and nothing recorded before is dropped from the file
    with pytest.raises(ValueError, match="two different shard counts"):
        study.sensitivity(str(tmp_path), orders=(2, 2), cfg=CFG, load=loader)


def _fp_and_texts():
    fp, jargon, bible, _ = loader()
    return fp, study.split_texts(jargon, bible, CFG.holdout_fraction), CFG


def test_lambda_is_chosen_on_validation_text_only(finished, monkeypatch):
    monkeypatch.setattr(study, "MAX_LAMBDA", 2.0)  # as the fixture ran it
    runs = study.load_runs(finished)
    choice = study.choose_lambda(runs, CFG)
    assert {"4b-gptq-fixed", "4b-gptq-maca", "4b-gptaq-fixed", "4b-gptaq-maca"} == set(choice)
    # make the Bible and the test half prefer another λ: the choice must not move
    other = copy.deepcopy(runs)
    for r in other:
        c = study.Cell(**r["cell"])
        if c.base in choice:
            better = c.reg != choice[c.base]["reg"]
            for t in ("bible", "jargon_test"):
                r["perplexity"][t] = {L: (1.0 if better else 1e6) for L in r["perplexity"][t]}
    assert study.choose_lambda(other, CFG) == choice
    # and the validation half does move it: to λ = 0, or from 0 to 0.5, the grid's top, which makes the sweep
    # grow (λ = 1 has no run: nothing is chosen until it has)
    for r in other:
        c = study.Cell(**r["cell"])
        if c.base in choice and c.seed == 0 and c.reg == (0.5 if choice[c.base]["reg"] == 0 else 0.0):
            r["perplexity"]["jargon_val"] = {L: 1.0 for L in r["perplexity"]["jargon_val"]}
    moved = study.choose_lambda(other, CFG)
    for k, c in choice.items():
        assert (moved[k]["reg"] == 0.0 and moved[k]["where"] == "zero") if c["reg"] else k not in moved


def test_summary_table_plots_and_cli(finished, capsys):
    table = Path(finished, "results.md").read_text()
    assert re.search(r"\| 4b-gptq-maca-reg0( \(λ chosen[^)]*\))? \| 2 \|", table) and "±" in table
    assert "(λ chosen" in table
    assert table.index("| fp |") < table.index("4b-rtn")
    assert Path(finished, "perplexity.png").stat().st_size > 0 and Path(finished, "lambda.png").stat().st_size > 0
    summary = json.loads(Path(finished, "summary.json").read_text())
    assert summary["runs"] == len(study.load_runs(finished)) and summary["planned_left"] == 0
    assert summary["wall_s"] > 0
    assert main(["study", "--out", finished, "--summarize-only"]) == 0
    assert "4b-gptaq-maca-reg0" in capsys.readouterr().out
    assert main(["study", "--out", str(Path(finished, "nothing")), "--summarize-only"]) == 2  # no such study


def test_a_study_does_not_resume_from_runs_of_another_configuration(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    other = study.StudyConfig(**{**study.asdict(CFG), "calib_tokens": 512})
    with pytest.raises(RuntimeError, match="made with another study configuration"):
        study.run_study(str(out), other, load=loader, log=lambda *_: None)
    # a wider grid is the same study: its runs are reused, only the new cells run
    ran = []
    wider = study.StudyConfig(**{**study.asdict(CFG), "lambdas": (0.0, 0.5, 0.25)})
    before = set(os.listdir(out / "runs"))
    study.run_study(str(out), wider, load=loader, max_runs=1, log=ran.append)
    new = set(os.listdir(out / "runs")) - before
    assert len(new) == 1 and new.pop().endswith("-reg0.25-s0.json")
