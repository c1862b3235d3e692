"""quantize_model never leaves silently wrong state: kill -9 at every commit point of the resume folder, weights
that changed since the folder was written, an interrupted run's model, an already-quantized model, a damaged
folder. Each rerun either matches an uninterrupted run bit for bit or refuses with an error naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_sequences, tiny_model  # noqa: E402

from maca_kernels.nn import QuantLinear  # noqa: E402
from maca_kernels.pipeline import quantize_model  # noqa: E402
from maca_kernels.resume import ResumeError  # noqa: E402

LENGTHS = [16, 32, 48, 64]
KW = dict(bits=4, group_size=32, calib_shards=2, progress=False, log=None)

# Runs quantize_model with os.replace / os.remove turned into SIGKILL at the n-th call (the commit points).
KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
from tiny_models import random_sequences, tiny_model
from maca_kernels.pipeline import quantize_model

calls, kill_at = [0], int(sys.argv[2])
def dying(real):
    def f(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return f
os.replace, os.remove = dying(os.replace), dying(os.remove)
quantize_model(tiny_model(seed=0, layers=2), random_sequences({lengths!r}, seed=1), bits=4, group_size=32,
               method=sys.argv[3], resume_dir=sys.argv[1], calib_shards=2, progress=False, log=None)
print("calls", calls[0])
"""


def run(resume_dir=None, method="gptq", model=None, **kw):
    model = tiny_model(seed=0, layers=2) if model is None else model
    return quantize_model(model, random_sequences(LENGTHS, seed=1), method=method, resume_dir=resume_dir,
                          **{**KW, **kw})


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def uninterrupted():
    return {m: run(method=m) for m in ("gptq", "rtn")}


def _killed_run(tmp_path, kill_at: int, method: str) -> subprocess.CompletedProcess:
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(here=str(Path(__file__).parent), lengths=LENGTHS))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads decide bits on a CPU
    return subprocess.run([sys.executable, str(script), str(tmp_path / "state"), str(kill_at), method],
                          capture_output=True, text=True, timeout=300, env=env)


def test_kill_at_every_commit_point_then_resume_is_bit_identical(tmp_path, uninterrupted, method="gptq"):
    done = _killed_run(tmp_path, 10**6, method)
    assert done.returncode == 0, done.stderr
    n_points = int(done.stdout.split("calls ")[1])
    for kill_at in range(1, n_points + 1):
        state = tmp_path / "state"
        for p in state.iterdir() if state.exists() else []:
            p.unlink()
        p = _killed_run(tmp_path, kill_at, method)
        assert p.returncode == -signal.SIGKILL, (kill_at, p.stdout, p.stderr)
        assert_same(run(str(state), method), uninterrupted[method])
    # per layer: its file, each shard's streams, the manifest; then the previous layer's streams removed
    assert n_points == 2 * (1 + 2 + 1) + 2


def test_changed_weights_are_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path), callback=_interrupt_at("model.layers.1."))
    tuned = tiny_model(seed=0, layers=2)  # the same config, one finished layer's weights fine-tuned
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(ResumeError, match="layer 0 was quantized from other weights"):
        run(str(tmp_path), model=tuned)
    other = tiny_model(seed=0, layers=2)  # a weight outside the decoder layers
    with torch.no_grad():
        other.model.embed_tokens.weight[3, 1] += 1e-3
    with pytest.raises(ResumeError, match="other calibration data or model weights"):
        run(str(tmp_path), model=other)


def _interrupt_at(prefix: str):
    def callback(name, H, r):
        if name.startswith(prefix):
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("where", ["solve", "install"])
def test_interrupted_run_leaves_the_model_as_it_was(tmp_path, uninterrupted, monkeypatch, where):
    model = tiny_model(seed=0, layers=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if where == "solve":
        callback = _interrupt_at("model.layers.1.mlp")
    else:  # Ctrl-C half way through swapping the QuantLinear modules in
        import maca_kernels.pipeline.run as pl

        real, n = pl.swap, [0]

        def swap(*a):
            n[0] += 1
            if n[0] == 9:
                raise KeyboardInterrupt
            return real(*a)

        monkeypatch.setattr(pl, "swap", swap)
        callback = None
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path), model=model, callback=callback)
    monkeypatch.undo()
    assert model.training and getattr(model.config, "quantization_config", None) is None
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the documented recovery: the same call again, on the same model and folder
    assert_same(run(str(tmp_path), model=model), uninterrupted["gptq"])


def test_quantizing_a_quantized_model_is_refused(uninterrupted):
    model = uninterrupted["rtn"]
    cfg = dict(model.config.quantization_config)
    with pytest.raises(ValueError, match="already quantized"):
        run(model=model, bits=3)
    assert model.config.quantization_config == cfg
    plain = tiny_model(seed=0, layers=2)
    plain.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="already quantized"):
        run(model=plain)


def _state_after_one_layer(tmp_path) -> Path:
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path), callback=_interrupt_at("model.layers.1."))
    return tmp_path


def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "progress.json").read_text())
    edit(m)
    (folder / "progress.json").write_text(json.dumps(m))


def _rewrite_layer(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    from maca_kernels.resume import file_sha256

    f = folder / "layer_0000.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))
    _edit_manifest(folder, lambda m: m["files"].__setitem__(f.name, file_sha256(str(f))))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "manifest truncated": (lambda d: _truncate(d / "progress.json"), "progress.json is unreadable"),
    "manifest key missing": (lambda d: _edit_manifest(d, lambda m: m.pop("files")), "progress.json is unreadable"),
    "manifest wrong type": (lambda d: _edit_manifest(d, lambda m: m.__setitem__("files", [])),
                            "'files' is a list, expected a dict"),
    "group size wrong type": (lambda d: _edit_manifest(d, lambda m: m["modules"]["model.layers.0.mlp.up_proj"]
                                                       .__setitem__("group_size", "32")), "invalid settings"),
    "manifest old format": (lambda d: _edit_manifest(d, lambda m: m.__setitem__("format", 1)), "has format 1"),
    "module settings": (lambda d: _edit_manifest(d, lambda m: m["modules"]["model.layers.0.mlp.up_proj"].pop("bits")),
                        "incomplete or invalid settings"),
    "streams truncated": (lambda d: _truncate(d / "streams_0000_0001.safetensors"),
                          "streams_0000_0001.safetensors does not match"),
    "layer missing": (lambda d: (d / "layer_0000.safetensors").unlink(), "layer_0000.safetensors is missing"),
    "tensor missing": (lambda d: _rewrite_layer(d, lambda t: t.pop("model.layers.0.mlp.up_proj.scales")),
                       "has no tensor 'model.layers.0.mlp.up_proj.scales'"),
    "wrong shape": (lambda d: _rewrite_layer(d, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.codes",
                                                                        torch.zeros(3, 5, dtype=torch.int32))),
                    r"'model.layers.0.mlp.up_proj.codes' of shape \(3, 5\)"),
    "foreign file": (lambda d: (d / "notes.md").write_text("mine"), "did not write"),
    "earlier version": (lambda d: (d / "streams.safetensors").write_bytes(b"x"), "earlier version"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_resume_folder_names_the_file(tmp_path, damage):
    folder = _state_after_one_layer(tmp_path)
    edit, message = DAMAGE[damage]
    edit(folder)
    with pytest.raises(ResumeError, match=message) as e:
        run(str(folder))
    assert str(folder) in str(e.value)
    if damage != "foreign file":
        assert "delete the folder" in str(e.value)


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_one_working_copy_at_a_time(monkeypatch, method):
    """Each layer's working copy is freed before the next is made: peak memory stays at one layer (plus GPTAQ's
    float copy), whatever the depth."""
    import weakref

    import maca_kernels.pipeline.run as pl

    alive, real_linears, real_layer = [], pl.linears, pl._quantize_layer

    def linears(layer, *args):
        out = real_linears(layer, *args)
        alive.extend(weakref.ref(m) for m in out.values())
        return out

    def quantize_layer(job, source, *a, **k):
        assert not [r for r in alive if r() is not None and r() not in set(real_linears(source).values())]
        return real_layer(job, source, *a, **k)

    monkeypatch.setattr(pl, "linears", linears)
    monkeypatch.setattr(pl, "_quantize_layer", quantize_layer)
    run(method=method, model=tiny_model(seed=0, layers=3))
