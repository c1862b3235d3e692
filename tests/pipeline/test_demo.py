"""The demo's flow and outputs on a tiny model and short texts (the real one runs in `make demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_model  # noqa: E402

from maca_kernels import demo, embedded  # noqa: E402


def test_demo_writes_every_run(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "ensure_all", lambda install=True: {})
    monkeypatch.setattr(embedded, "load_model", lambda install=True: (tiny_model(seed=0), ByteTokenizer()))
    monkeypatch.setattr(embedded, "jargon_text", lambda install=True: "hacker jargon, " * 2000)
    monkeypatch.setattr(embedded, "bible_text", lambda install=True: "In the beginning God created. " * 1000)
    lines = []
    result = demo.run_demo(str(tmp_path), group_size=32, calib_tokens=1024, eval_tokens=256, eval_lengths=(32, 128),
                           calib_lengths=(32, 64, 128), log=lines.append)
    assert list(result["runs"]) == list(demo.RUNS)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"].keys() == result["runs"].keys() and saved["wall_s"] > 0
    for run in demo.RUNS:
        for text in ("jargon (held out)", "bible (out of domain)"):
            assert all(v > 1 for v in saved["runs"][run]["perplexity"][text].values())
    assert saved["calibration"]["gptq-fixed"]["total_tokens"] == saved["calibration"]["gptq-maca"]["total_tokens"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + len(demo.RUNS) and "gptq-maca" in table
    assert (tmp_path / "perplexity.png").stat().st_size > 1000
    assert any("demo wall time" in line for line in lines)
