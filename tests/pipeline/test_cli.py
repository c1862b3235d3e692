"""The command line: one-line errors with exit codes scripts can rely on, and a quantize → eval round trip on
a tiny model folder written by the test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_model  # noqa: E402

from maca_kernels.cli import EXIT_USAGE, main  # noqa: E402


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    path = tmp_path / "tiny"
    tiny_model(seed=0).save_pretrained(path)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: ByteTokenizer())
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 400)
    return path, text


def run(capsys, *argv):
    capsys.readouterr()  # drop what the fixture printed
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_errors(capsys, tmp_path, model_dir):
    path, text = model_dir
    code, err = run(capsys, "quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == EXIT_USAGE and "no such folder" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, "eval", "--model", str(tmp_path / "empty"), "--text", str(text))
    assert code == EXIT_USAGE and "no config.json" in err
    code, err = run(capsys, "quantize", "--model", str(path), "--out", str(tmp_path / "o"), "--group-size", "48",
                    "--text", str(text))
    assert code == EXIT_USAGE and "does not divide" in err
    code, err = run(capsys, "quantize", "--model", str(path), "--out", str(tmp_path / "o"), "--group-size", "32",
                    "--text", str(tmp_path / "missing.txt"))
    assert code == EXIT_USAGE and "no such file" in err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, err = run(capsys, "quantize", "--model", str(path), "--out", str(tmp_path / "o"), "--group-size", "32",
                    "--text", str(short), "--calib-tokens", "4096", "--lengths", "64", "128")
    assert code == EXIT_USAGE and "tokens" in err
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", str(path), "--out", "x", "--bits", "5"])
    assert exc.value.code == EXIT_USAGE


def test_quantize_then_eval(capsys, tmp_path, model_dir):
    path, text = model_dir
    out = tmp_path / "q"
    code, err = run(capsys, "quantize", "--model", str(path), "--out", str(out), "--group-size", "32",
                    "--text", str(text), "--calib-tokens", "2048", "--calib", "fixed", "--seq-len", "128")
    assert code == 0, err
    code, err = run(capsys, "quantize", "--model", str(path), "--out", str(tmp_path / "m"), "--group-size", "32",
                    "--text", str(text), "--calib-tokens", "2048", "--lengths", "32", "64", "128")
    assert code == 0, err
    assert (out / "config.json").exists()
    code, err = run(capsys, "eval", "--model", str(out), "--text", str(text), "--lengths", "64", "--max-tokens", "512")
    assert code == 0, err
