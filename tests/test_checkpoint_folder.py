"""save_quantized never deletes what it did not write: folders that are not our checkpoints are refused, a
checkpoint is replaced only with overwrite=True (and then only its own files), a kill -9 at any point of a
replacement leaves the old or the new checkpoint whole with the user's files, and the next save removes the
temporary folder the kill left."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maca_kernels import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from tiny_models import tiny_model  # noqa: E402

from maca_kernels.pipeline import quantize_model  # noqa: E402


def quantized(bits: int):
    return quantize_model(tiny_model(seed=0), None, bits=bits, group_size=32, method="rtn", progress=False, log=None)


def logits(model):
    with torch.no_grad():
        return model(torch.arange(40).reshape(2, 20) % 96).logits


def user_files(folder: Path) -> dict[str, bytes]:
    (folder / "notes.md").write_text("my notes")
    (folder / "src").mkdir()
    (folder / "src" / "train.py").write_text("print('mine')")
    return {"notes.md": b"my notes", "src/train.py": b"print('mine')"}


def assert_kept(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def test_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    model = quantized(4)
    project = tmp_path / "project"
    project.mkdir()
    mine = user_files(project)
    with pytest.raises(FileExistsError, match="not empty and holds no checkpoint"):
        ckpt.save_quantized(model, project, overwrite=True)
    monkeypatch.chdir(project)
    with pytest.raises(FileExistsError, match="not empty"):
        ckpt.save_quantized(model, ".")
    assert_kept(project, mine)
    assert sorted(os.listdir(project)) == ["notes.md", "src"] and sorted(os.listdir(tmp_path)) == ["project"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        ckpt.save_quantized(model, tmp_path / "file")
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert ckpt.save_quantized(model, tmp_path / "empty") == tmp_path / "empty"


def test_overwrite_replaces_only_its_own_files(tmp_path):
    old, new = quantized(4), quantized(3)
    out = ckpt.save_quantized(old, tmp_path / "ck")
    mine = user_files(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save_quantized(new, out)
    assert torch.equal(logits(ckpt.load_quantized(out, dtype=torch.float32)), logits(old))
    ckpt.save_quantized(new, out, overwrite=True)
    assert torch.equal(logits(ckpt.load_quantized(out, dtype=torch.float32)), logits(new))
    assert_kept(out, mine)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # a user file with a name the new checkpoint writes is never replaced
    (out / "model.safetensors.index.json").write_text("{}")  # ours only when sharded
    with pytest.raises(FileExistsError, match="model.safetensors.index.json was not written by save_quantized"):
        ckpt.save_quantized(new, out, overwrite=True, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").read_text() == "{}"


def test_files_share_one_mode(tmp_path):
    out = ckpt.save_quantized(quantized(4), tmp_path / "ck")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


# Saves over an existing checkpoint, SIGKILLed before the n-th step of the replacement (or right after the
# exchange of the folders): writing, linking the user's files, fsyncs, the exchange, removing the old folder.
KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
import maca_kernels.checkpoint as ckpt
from tiny_models import tiny_model
from maca_kernels.pipeline import quantize_model

calls, kill_at = [0], int(sys.argv[2])
def step():
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def dying(real, after=False):
    def f(*a, **k):
        step()
        out = real(*a, **k)
        if after:
            step()
        return out
    return f
for name in ("_write_shards", "_keep_foreign", "_fsync_dir", "_discard_old"):
    setattr(ckpt, name, dying(getattr(ckpt, name)))
ckpt._exchange = dying(ckpt._exchange, after=True)
model = quantize_model(tiny_model(seed=0), None, bits=3, group_size=32, method="rtn", progress=False, log=None)
ckpt.save_quantized(model, sys.argv[1], overwrite=True)
print("calls", calls[0])
"""


def _save_killed(tmp_path, out, kill_at):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(here=str(Path(__file__).parent / "pipeline")))
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kill_during_replacement_keeps_a_whole_checkpoint(tmp_path):
    old, new = quantized(4), quantized(3)
    want = {"old": logits(old), "new": logits(new)}
    out = tmp_path / "ck"
    done = _save_killed(tmp_path, out, 10**6)  # count the steps of a save into a new folder
    assert done.returncode == 0, done.stderr
    n_points = int(done.stdout.split("calls ")[1]) + 3  # a replacement adds linking, the exchange, the discard
    seen = set()
    for kill_at in range(1, n_points + 1):
        ckpt.save_quantized(old, out, overwrite=True)
        mine = user_files(out)
        p = _save_killed(tmp_path, out, kill_at)
        assert p.returncode == -signal.SIGKILL, (kill_at, p.stdout, p.stderr)
        got = logits(ckpt.load_quantized(out, dtype=torch.float32))
        which = "old" if torch.equal(got, want["old"]) else "new"
        assert torch.equal(got, want[which]), kill_at
        seen.add(which)
        assert_kept(out, mine)
        ckpt.save_quantized(old, out, overwrite=True)  # the next save removes the killed save's temp folder
        assert sorted(os.listdir(tmp_path)) == ["ck", "kill.py"], kill_at
        assert_kept(out, mine)
        for name in mine:  # the next round starts from the checkpoint alone
            (out / name).unlink()
        (out / "src").rmdir()
    assert seen == {"old", "new"}
