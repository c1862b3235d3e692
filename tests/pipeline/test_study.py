"""The study's bookkeeping on a tiny model: calibration never touches evaluation text, equal token budgets,
λ chosen on in-domain validation text only, resumable one-file-per-run output, the table and plots."""

from __future__ import annotations

import copy
import json
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

CFG = study.StudyConfig(bits=(4,), group_size=32, seeds=(0, 1), lambdas=(0.0, 0.5), calib_tokens=256,
                        calib_lengths=(16, 32, 64), eval_lengths=(16, 64), eval_tokens=128)


def loader():
    g = torch.Generator().manual_seed(0)
    jargon = torch.randint(0, 96, (4000,), generator=g)
    bible = torch.randint(0, 96, (1000,), generator=g)
    return tiny_model(seed=0), jargon, bible, {"model": "tiny"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    study.run_study(out, CFG, load=loader, log=lambda *_: None)
    return out


def test_plan_covers_the_grid_once():
    cells = study.plan(CFG)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) == 1 + 1 + 2 * 2 * 2 + 2 + 1 + 2 * 2
    assert keys[:2] == ["fp", "4b-rtn"]
    assert {c.seed for c in cells if c.method == "gptaq"} == {0, 1}
    assert {c.reg for c in cells if c.scheme == "maca"} == {0.0, 0.5}


def test_every_run_is_one_file_and_calibration_stays_off_evaluation_text(finished):
    runs = study.load_runs(finished)
    assert sorted(r["key"] for r in runs) == sorted(c.key for c in study.plan(CFG))
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
    monkeypatch.setattr(study, "run_cell", lambda cell, *a: calls.append(cell.key) or run_cell(cell, *a))
    study.run_study(str(tmp_path), CFG, load=loader, max_runs=3, log=lambda *_: None)
    first = sorted(os.listdir(tmp_path / "runs"))
    assert len(calls) == 3 and len(first) == 3
    stamps = {f: os.path.getmtime(tmp_path / "runs" / f) for f in first}
    study.run_study(str(tmp_path), CFG, load=loader, max_runs=2, log=lambda *_: None)
    assert len(calls) == 5 and calls[:3] != calls[3:]
    assert all(os.path.getmtime(tmp_path / "runs" / f) == t for f, t in stamps.items())


def test_lambda_is_chosen_on_validation_text_only(finished):
    agg = study.aggregate(study.load_runs(finished))
    choice = study.choose_lambda(agg)
    assert set(choice) == {"4b-gptq-fixed", "4b-gptq-maca"}
    # make the Bible and the test half prefer the other λ: the choice must not move
    other = copy.deepcopy(agg)
    for key, c in choice.items():
        for g, e in other.items():
            if g.startswith(key + "-reg"):
                better = e["cell"]["reg"] != c["reg"]
                for t in ("bible", "jargon_test"):
                    e[t] = {L: (1.0 if better else 1e6, 0.0) for L in e[t]}
    assert study.choose_lambda(other) == choice
    # and the validation half does move it
    for key, c in choice.items():
        for g, e in other.items():
            if g.startswith(key + "-reg") and e["cell"]["reg"] != c["reg"]:
                e["jargon_val"] = {L: (1.0, 0.0) for L in e["jargon_val"]}
    assert all(study.choose_lambda(other)[k]["reg"] != c["reg"] for k, c in choice.items())


def test_summary_table_plots_and_cli(finished, capsys):
    table = Path(finished, "results.md").read_text()
    assert re.search(r"\| 4b-gptq-maca-reg0( \(λ chosen\))? \| 2 \|", table) and "±" in table
    assert "(λ chosen)" in table
    assert table.index("| fp |") < table.index("4b-rtn")
    assert Path(finished, "perplexity.png").stat().st_size > 0 and Path(finished, "lambda.png").stat().st_size > 0
    summary = json.loads(Path(finished, "summary.json").read_text())
    assert summary["runs"] == len(study.plan(CFG)) and summary["wall_s"] > 0
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
