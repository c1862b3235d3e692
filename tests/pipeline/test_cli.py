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


def test_inputs_checked_before_the_run(capsys, tmp_path, model_dir, monkeypatch):
    """Bad --out, --device and --text fail at once with one line and exit 2, before any quantization."""
    path, text = model_dir
    ran = []
    monkeypatch.setattr("maca_kernels.pipeline.quantize_model", lambda *a, **k: ran.append(1))
    q = ["quantize", "--model", str(path), "--group-size", "32"]
    (tmp_path / "file").write_text("x")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("mine")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes([0xD2, 0xFF, 0x00]) * 50)
    cases = [
        ([*q, "--out", str(tmp_path / "file"), "--text", str(text)], "exists and is not a folder"),
        ([*q, "--out", str(project), "--text", str(text)], "not empty and holds no checkpoint"),
        ([*q, "--out", str(tmp_path / "o"), "--text", str(text), "--device", "bogus"], "--device bogus: not a device"),
        ([*q, "--out", str(tmp_path / "o"), "--text", str(text), "--device", "meta:7"], "--device meta:7"),
        ([*q, "--out", str(tmp_path / "o"), "--text", str(tmp_path)], "is a folder, expected a text file"),
        ([*q, "--out", str(tmp_path / "o"), "--text", str(binary)], f"{binary}: not a UTF-8 text file"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append(([*q, "--out", str(tmp_path / "o"), "--text", str(text), "--device", "cuda"],
                      "no cuda device is available"))
    for argv, message in cases:
        code, err = run(capsys, *argv)
        assert code == EXIT_USAGE and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not ran and (project / "notes.md").read_text() == "mine"


def test_folder_without_tokenizer(capsys, tmp_path):
    path = tmp_path / "tiny"
    tiny_model(seed=0).save_pretrained(path)
    text = tmp_path / "text.txt"
    text.write_text("some text " * 100)
    q = ["quantize", "--model", str(path), "--group-size", "32"]
    code, err = run(capsys, *q, "--out", str(tmp_path / "a"), "--text", str(text))
    assert code == EXIT_USAGE and "no usable tokenizer" in err and len(err.splitlines()) == 1, err
    code, err = run(capsys, *q, "--out", str(tmp_path / "b"), "--method", "rtn")  # RTN reads no text
    assert code == 0, err
    assert "no usable tokenizer" in err and (tmp_path / "b" / "model.safetensors").exists()
    code, err = run(capsys, *q, "--out", str(tmp_path / "b"), "--method", "rtn", "--bits", "3")
    assert code == EXIT_USAGE and "--overwrite" in err
    code, err = run(capsys, *q, "--out", str(tmp_path / "b"), "--method", "rtn", "--bits", "3", "--overwrite")
    assert code == 0, err


def test_every_quantize_model_option_has_a_flag(capsys, tmp_path, model_dir, monkeypatch):
    """Each flag reaches quantize_model (here through quantize_folder) as the option of the same meaning; the
    defaults are quantize_model's own."""
    import inspect

    from maca_kernels.pipeline import quantize_model

    path, text = model_dir
    seen = []
    monkeypatch.setattr("maca_kernels.pipeline.streamed.quantize_folder", lambda *a, **k: seen.append(k) or "x")
    q = ["quantize", "--model", str(path), "--group-size", "32", "--text", str(text), "--calib-tokens", "2048",
         "--lengths", "32", "64", "128"]
    (tmp_path / "o.yaml").write_text("down_proj:\n  bits: 8\nmodel.layers.0:\n  group_size: 16\n")
    (tmp_path / "o.json").write_text('{"q_proj": {"bits": 3}}')
    assert run(capsys, *q, "--out", str(tmp_path / "a"))[0] == 0
    assert run(capsys, *q, "--out", str(tmp_path / "b"), "--weighting", "token", "--static-groups", "--act-order",
               "--damp", "0.05", "--reg", "2", "--alpha", "0.5", "--mse", "--block-size", "64", "--checkpoint-format",
               "gptq_v2", "--max-batch-tokens", "4096", "--overrides", str(tmp_path / "o.yaml"))[0] == 0
    assert run(capsys, *q, "--out", str(tmp_path / "c"), "--calib", "fixed", "--seq-len", "128",
               "--overrides", str(tmp_path / "o.json"))[0] == 0
    defaults, given, fixed = seen
    sig = inspect.signature(quantize_model).parameters
    for k in ("static_groups", "damp", "reg", "alpha", "mse", "block_size", "checkpoint_format", "max_batch_tokens",
              "overrides", "sym", "act_order", "calib_shards", "moe_calibration", "moe_min_tokens", "activations"):
        assert defaults[k] == sig[k].default, k
    assert defaults["weighting"] == "sequence" and fixed["weighting"] == "token"  # by --calib unless given
    assert given == dict(given, weighting="token", static_groups=True, act_order=True, damp=0.05, reg=2.0, alpha=0.5,
                         mse=True, block_size=64, checkpoint_format="gptq_v2", max_batch_tokens=4096,
                         overrides={"down_proj": {"bits": 8}, "model.layers.0": {"group_size": 16}})
    assert fixed["overrides"] == {"q_proj": {"bits": 3}}


def test_bad_option_values_fail_before_the_model_loads(capsys, tmp_path, model_dir, monkeypatch):
    path, text = model_dir
    monkeypatch.setattr("maca_kernels.cli._load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("maca_kernels.cli._skeleton", lambda *a, **k: pytest.fail("the model was loaded"))
    q = ["quantize", "--model", str(path), "--out", str(tmp_path / "o"), "--text", str(text)]
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "key.yaml").write_text("down_proj:\n  damp: 0.1\n")
    (tmp_path / "bits.yml").write_text("down_proj:\n  bits: 5\n")
    cases = [
        (["--damp", "-0.1"], "--damp must be a fraction ≥ 0 of mean(diag H), got -0.1"),
        (["--damp", "nan"], "--damp must be a fraction ≥ 0 of mean(diag H), got nan"),
        (["--reg", "-1"], "--reg must be a number ≥ 0, got -1.0"),
        (["--alpha", "inf"], "--alpha must be a number ≥ 0, got inf"),
        (["--block-size", "0"], "--block-size must be a positive int, got 0"),
        (["--max-batch-tokens", "-5"], "--max-batch-tokens must be a positive int, got -5"),
        (["--overrides", str(tmp_path / "none.json")], "--overrides: no such file"),
        (["--overrides", str(tmp_path / "bad.json")], "is not valid JSON"),
        (["--overrides", str(tmp_path / "list.json")], "--overrides must map module name patterns to settings"),
        (["--overrides", str(tmp_path / "key.yaml")], "--overrides['down_proj']: only bits and group_size can differ "
                                                      "per module, got ['damp']"),
        (["--overrides", str(tmp_path / "bits.yml")], "--overrides['down_proj']: bits must be one of"),
    ]
    for extra, message in cases:
        code, err = run(capsys, *q, *extra)
        assert code == EXIT_USAGE and message in err and len(err.splitlines()) == 1, (extra, err)
    for bad in (["--weighting", "tokens"], ["--reg", "strong"]):  # argparse's own: an unknown choice, not a number
        with pytest.raises(SystemExit) as exc:
            main([*q, *bad])
        assert exc.value.code == EXIT_USAGE
