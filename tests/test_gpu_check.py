"""benchmarks/gpu_check.py (``make gpu-check``) on the CPU: the dry run end to end, the §5 table, the
budget logic and the partial / atomic result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_check as gc  # noqa: E402

# Every GPU row of SPEC §5, as the figures gpu_check reports for it.
SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x28672"]
EXPECTED = (
    [f"hessian.d{d}.{m}" for d in (4096, 8192) for m in ("vs_cublas", "vs_reference", "error")]
    + [f"gptq.{s}.{m}" for s in ("4096x4096", "14336x4096") for m in ("speedup", "loss")]
    + [f"qmm.m1.int{b}.{s}" for b in (4, 3, 2) for s in SHAPES]
    + [f"qmm.cuda.m1.int{b}.{s}" for b in (4, 3, 2) for s in SHAPES]  # the opt-in CUDA GEMV, same targets
    + [f"qmm.cuda.m{m}.int4.{s}" for m in (16, 128, 2048) for s in SHAPES]  # above 16: Triton on its layout
    + [f"qmm.m{m}.int4.{s}" for m in (16, 128, 2048) for s in SHAPES]
    + [f"qmm.act_order.{s}" for s in SHAPES]
    + [f"qmm.cuda.act_order.{s}" for s in SHAPES]
    + ["hessian.cross.time", "hessian.cross.error"]
    + [f"hessian.per_call.{m}{sfx}" for m in ("overhead", "syncs") for sfx in ("", "_nocheck")]
)


def test_targets_cover_every_gpu_row_of_spec_5():
    assert sorted(t.key for t in gc.TARGETS) == sorted(EXPECTED)
    by_key = {t.key: t for t in gc.TARGETS}
    assert (by_key["hessian.d4096.vs_cublas"].cmp, by_key["hessian.d4096.vs_cublas"].target) == (">=", 1.3)
    assert by_key["hessian.d8192.vs_reference"].target == 10.0
    assert by_key["gptq.14336x4096.speedup"].target == 20.0 and by_key["gptq.4096x4096.loss"].target == 0.5
    assert [by_key[f"qmm.m1.int{b}.4096x4096"].target for b in (4, 3, 2)] == [3.1, 4.0, 5.9]
    assert [by_key[f"qmm.m{m}.int4.8192x28672"].target for m in (16, 128, 2048)] == [3.0, 1.2, 0.85]
    assert (by_key["qmm.act_order.4096x4096"].cmp, by_key["qmm.act_order.4096x4096"].target) == ("<=", 1.1)
    assert by_key["hessian.cross.time"].target == 2.0 and by_key["hessian.per_call.overhead"].target == 5.0
    assert all(t.how and t.case and t.measure and t.cmp in (">=", "<=") for t in gc.TARGETS)


def test_dry_run_end_to_end(tmp_path):
    results_before = set(os.listdir(gc.RESULTS_DIR)) if os.path.isdir(gc.RESULTS_DIR) else set()
    out = tmp_path / "dry"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "DRY RUN" in p.stdout
    jsons = list(out.glob("*.json"))
    assert [f.name for f in jsons] == [jsons[0].name] and jsons[0].name.endswith("-dry-run-cpu.json")
    doc = json.loads(jsons[0].read_text())
    md = jsons[0].with_suffix(".md").read_text()

    assert doc["dry_run"] is True and doc["status"] == "complete"
    assert [s["name"] for s in doc["steps"]] == ["environment", "build", "tests", "hessian", "gptq", "quant_matmul",
                                                 "pipeline"]
    assert all(s["status"] in ("ok", "skipped") for s in doc["steps"]), doc["steps"]
    env = doc["environment"]
    for k in ("date", "python", "torch", "triton", "device"):
        assert k in env
    assert "DRY RUN" in env["device"]
    tests = doc["tests"]
    assert {"passed", "failed", "errors", "skipped"} <= tests.keys()
    assert tests["status"] == "dry run" and tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0

    rows = {r["key"]: r for r in doc["targets"]}
    assert sorted(rows) == sorted(EXPECTED)
    for r in rows.values():
        assert r["target"] is not None and r["cmp"] in (">=", "<=")
        assert r["status"] in ("dry run", "not measured"), r  # a dry run never passes or fails a target
        assert (r["value"] is None) == (r["status"] == "not measured")
        if r["status"] == "not measured":
            assert r["reason"]
        assert f"`{r['key']}`" in md
    cuda_gemv = [k for k in rows if k.startswith("qmm.cuda.")]  # needs NVRTC and a GPU: not measured in a dry run
    assert all(rows[k]["status"] == "not measured" for k in cuda_gemv)
    # all but the CUDA sync counts and the CUDA GEMV
    assert sum(r["status"] == "dry run" for r in rows.values()) >= len(EXPECTED) - 2 - len(cuda_gemv)
    assert "pass" not in doc["summary"] or doc["summary"]["pass"] == 0
    assert md.startswith("# DRY RUN") and "| pass |" not in md and "| fail |" not in md
    batch, *pipe = doc["raw"]["pipeline"]  # every case ran: experts batched; time per layer, where streams waited
    assert batch["kind"] == "experts batched" and batch["same_codes"] is True and batch["experts"] == 4
    assert "gptq_quantize_batched" in md
    assert [(r["method"], r["activations_on"]) for r in pipe] == [("gptq", "cpu"), ("gptq", "cpu"), ("gptaq", "cpu")]
    assert pipe[1]["model"] == "tiny Qwen3-MoE, 8 experts, 1 layer, float32"
    assert all(r["per_layer_s"] > 0 and r["memory_mb"]["hessian"] > 0 for r in pipe)
    assert "## Pipeline (measured; no §5 target)" in md and "| tiny Llama, 2 layers, float32 | gptaq |" in md
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    after = set(os.listdir(gc.RESULTS_DIR)) if os.path.isdir(gc.RESULTS_DIR) else set()
    assert after == results_before  # nothing written to benchmarks/results/


def _fake_env(run):
    run.env = {"device": "Fake GPU 9000", "date": "2030-01-01T00:00:00+00:00", "python": "3", "torch": "t",
               "triton": "t"}
    return "ok"


def _measure_one(key, value):
    def step(run):
        run.measured(key, value, "synthetic")
        return "ok"

    return step


def _load(out):
    (path,) = out.glob("*.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_failing_step_is_recorded_and_later_steps_still_run(tmp_path):
    def boom(run):
        raise RuntimeError("injected failure")

    run = gc.Run(out_dir=str(tmp_path), dry=False)
    gc.run_steps(run, steps=[("environment", _fake_env), ("hessian", boom),
                             ("quant_matmul", _measure_one("qmm.m1.int4.4096x4096", 3.5)),
                             ("later", _measure_one("qmm.m1.int3.4096x4096", 3.0))])
    doc, md = _load(tmp_path)
    assert doc["status"] == "complete"
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [
        ("environment", "ok"), ("hessian", "failed"), ("quant_matmul", "ok"), ("later", "ok")]
    assert "injected failure" in doc["steps"][1]["note"]
    rows = {r["key"]: r for r in doc["targets"]}
    assert rows["hessian.d4096.vs_cublas"]["status"] == "not measured"
    assert "hessian step failed: RuntimeError: injected failure" in rows["hessian.d4096.vs_cublas"]["reason"]
    assert rows["qmm.m1.int4.4096x4096"]["status"] == "pass"  # 3.5× ≥ 3.1×
    assert rows["qmm.m1.int3.4096x4096"]["status"] == "fail"  # 3.0× < 4.0×
    assert rows["gptq.4096x4096.speedup"]["reason"] == "not reached in this run"
    assert doc["summary"] == {"pass": 1, "fail": 1, "not measured": len(EXPECTED) - 2, "dry run": 0}
    assert tmp_path.joinpath("2030-01-01-fake-gpu-9000.json").exists()  # <date>-<gpu>
    assert "| pass |" in md and "| fail |" in md


def test_interrupt_keeps_partial_results(tmp_path):
    def interrupted(run):
        raise KeyboardInterrupt

    run = gc.Run(out_dir=str(tmp_path), dry=False)
    with pytest.raises(KeyboardInterrupt):
        gc.run_steps(run, steps=[("environment", _fake_env),
                                 ("quant_matmul", _measure_one("qmm.m1.int2.4096x4096", 6.0)),
                                 ("gptq", interrupted), ("never", _measure_one("qmm.m1.int3.4096x4096", 5.0))])
    doc, _ = _load(tmp_path)
    assert doc["status"].startswith("interrupted")
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [
        ("environment", "ok"), ("quant_matmul", "ok"), ("gptq", "interrupted")]
    rows = {r["key"]: r for r in doc["targets"]}
    assert rows["qmm.m1.int2.4096x4096"]["value"] == 6.0 and rows["qmm.m1.int2.4096x4096"]["status"] == "pass"
    assert rows["qmm.m1.int3.4096x4096"]["status"] == "not measured"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_results_are_written_after_each_step(tmp_path):
    seen = []

    def look(run):  # by the time the third step runs, the second step's value is on disk
        doc, _ = _load(tmp_path)
        seen.append({r["key"]: r["value"] for r in doc["targets"]}["hessian.cross.time"])
        return "ok"

    gc.run_steps(gc.Run(out_dir=str(tmp_path), dry=False),
                 steps=[("environment", _fake_env), ("hessian", _measure_one("hessian.cross.time", 1.5)), ("x", look)])
    assert seen == [1.5]


def test_atomic_write_keeps_the_old_file_when_replacing_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    gc._atomic_write(str(path), "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gc.os, "replace", broken_replace)
    with pytest.raises(OSError):
        gc._atomic_write(str(path), "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]


def test_budget_skips_remaining_cases_and_records_failures(tmp_path, monkeypatch):
    run = gc.Run(out_dir=str(tmp_path), dry=False)
    _fake_env(run)
    run.steps.append({"name": "quant_matmul", "status": "running", "note": ""})

    def ok():
        return [{"impl": "x"}], {"qmm.m1.int4.4096x4096": (4.0, "")}

    def fails():
        raise ValueError("bad shape")

    cases = [
        gc.Case("first", ["qmm.m1.int4.4096x4096"], ok),
        gc.Case("second", ["qmm.m1.int3.4096x4096"], fails),
        gc.Case("too slow", ["qmm.m1.int2.4096x4096"], ok, estimate_s=lambda: 1e9),
    ]
    assert gc.run_cases(run, "quant_matmul", cases, budget=60) == "partial"
    rows = {r["key"]: r for r in run.document()["targets"]}
    assert rows["qmm.m1.int4.4096x4096"]["status"] == "pass"
    assert "second failed: ValueError: bad shape" in rows["qmm.m1.int3.4096x4096"]["reason"]
    assert "predicted" in rows["qmm.m1.int2.4096x4096"]["reason"]
    assert run.raw["quant_matmul"] == [{"impl": "x"}]

    run2 = gc.Run(out_dir=str(tmp_path / "b"), dry=False)
    _fake_env(run2)
    run2.steps.append({"name": "gptq", "status": "running", "note": ""})
    assert gc.run_cases(run2, "gptq", cases[:1], budget=0) == "partial"
    rows = {r["key"]: r for r in run2.document()["targets"]}
    assert "first: skipped: the gptq budget (0 s) was used up" == rows["qmm.m1.int4.4096x4096"]["reason"]


def test_case_past_budget_and_grace_is_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "GRACE_S", 0)
    run = gc.Run(out_dir=str(tmp_path), dry=False)
    _fake_env(run)
    run.steps.append({"name": "hessian", "status": "running", "note": ""})

    def hang():
        import time

        time.sleep(30)
        return [], {}

    assert gc.run_cases(run, "hessian", [gc.Case("hang", ["hessian.cross.time"], hang)], budget=1) == "partial"
    row = next(r for r in run.document()["targets"] if r["key"] == "hessian.cross.time")
    assert "interrupted" in row["reason"]


@pytest.mark.parametrize("timed_out,failed,expected", [(True, 0, "partial"), (False, 0, "ok"), (True, 1, "failed"),
                                                        (False, 1, "failed")])
def test_tests_step_status(tmp_path, monkeypatch, timed_out, failed, expected):
    """The GPU tier's step: a budget that stops passing tests is "partial" (not a failure); a failing test fails."""
    run = gc.Run(out_dir=str(tmp_path), dry=False)
    _fake_env(run)
    run.steps.append({"name": "tests", "status": "running", "note": ""})

    class FakeProc:
        returncode = 1 if failed else 0
        calls = 0

        def communicate(self, timeout=None):
            FakeProc.calls += 1
            if timed_out and FakeProc.calls == 1:
                raise subprocess.TimeoutExpired("pytest", timeout)
            return "output", None

        def send_signal(self, sig):
            pass

    monkeypatch.setattr(gc.subprocess, "Popen", lambda *a, **k: FakeProc())
    monkeypatch.setattr(gc, "parse_junit", lambda path: {"passed": 5, "failed": failed, "errors": 0, "skipped": 2,
                                                         "failures": ["t::x"] if failed else []})
    assert gc.step_tests(run) == expected
    assert run.tests["status"] == {"partial": "partial", "ok": "pass", "failed": "fail"}[expected]
    assert ("budget" in run.tests.get("note", "")) == timed_out
