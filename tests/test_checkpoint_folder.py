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
    for where in (".", "..", str(project)):  # the working directory is never replaced, empty or not
        with pytest.raises(FileExistsError, match="is the working directory or holds it"):
            ckpt.save_quantized(model, where, overwrite=True)
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


def test_symlinked_folder_gets_the_checkpoint_where_it_points(tmp_path):
    target, link = tmp_path / "disk" / "ck", tmp_path / "ck-link"
    target.mkdir(parents=True)
    link.symlink_to(target)
    model = quantized(4)
    assert ckpt.save_quantized(model, link) == target
    mine = user_files(target)
    ckpt.save_quantized(quantized(3), link, overwrite=True)
    assert link.is_symlink() and (link / "model.safetensors").exists()
    assert_kept(target, mine)
    assert sorted(os.listdir(tmp_path)) == ["ck-link", "disk"] and sorted(os.listdir(tmp_path / "disk")) == ["ck"]


def test_files_share_one_mode(tmp_path):
    out = ckpt.save_quantized(quantized(4), tmp_path / "ck")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


# Saves over an existing checkpoint, SIGKILLed before the n-th step of the replacement (or right after the
# exchange of the folders): writing, linking the user's files, fsyncs, the exchange or the two renames that
# stand in for it where renameat2 is missing, removing the old folder.
KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
import maca_kernels.checkpoint as ckpt
from tiny_models import tiny_model
from maca_kernels.pipeline import quantize_model

steps, kill_at = [], int(sys.argv[2])
def step(label):
    steps.append(label)
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def dying(real, after=False):
    def f(*a, **k):
        step(real.__name__)
        out = real(*a, **k)
        if after:
            step(real.__name__ + " done")
        return out
    return f
if sys.argv[3] == "no-renameat2":
    ckpt._exchange = lambda a, b: False
for name in ("_write_shards", "_keep_foreign", "_fsync_dir", "_discard_old"):
    setattr(ckpt, name, dying(getattr(ckpt, name)))
ckpt._exchange = dying(ckpt._exchange, after=True)
os.rename = dying(os.rename)
model = quantize_model(tiny_model(seed=0), None, bits=3, group_size=32, method="rtn", progress=False, log=None)
ckpt.save_quantized(model, sys.argv[1], overwrite=True)
print("steps", ",".join(steps))
"""


def _save_killed(tmp_path, out, kill_at, exchange):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(here=str(Path(__file__).parent / "pipeline")))
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at), exchange], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("exchange", ["renameat2", "no-renameat2"])
def test_kill_during_replacement_keeps_a_whole_checkpoint(tmp_path, monkeypatch, exchange):
    if exchange == "no-renameat2":
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    old, new = quantized(4), quantized(3)
    want = {"old": logits(old), "new": logits(new)}
    out = tmp_path / "ck"
    ckpt.save_quantized(old, out)
    mine = user_files(out)
    done = _save_killed(tmp_path, out, 10**6, exchange)  # count the steps of a replacement
    assert done.returncode == 0, done.stderr
    steps = done.stdout.split("steps ")[1].strip().split(",")
    # without renameat2 only the renames differ from the other path (and the discard after them)
    points = [i + 1 for i, s in enumerate(steps) if exchange == "renameat2" or s in ("rename", "_discard_old")]
    seen = set()
    for kill_at in points:
        ckpt.save_quantized(old, out, overwrite=True)
        p = _save_killed(tmp_path, out, kill_at, exchange)
        assert p.returncode == -signal.SIGKILL, (kill_at, p.stdout, p.stderr)
        with pytest.raises(FileExistsError, match="overwrite=True"):  # a checkpoint the kill moved aside is put back,
            ckpt.save_quantized(new, out)  # and it is replaced only when asked
        got = logits(ckpt.load_quantized(out, dtype=torch.float32))
        which = "old" if torch.equal(got, want["old"]) else "new"
        assert torch.equal(got, want[which]), kill_at
        seen.add(which)
        assert_kept(out, mine)
        ckpt.save_quantized(old, out, overwrite=True)  # the next save removes the killed save's temp folder
        assert sorted(os.listdir(tmp_path)) == ["ck", "kill.py"], kill_at
        assert_kept(out, mine)
    assert seen == {"old", "new"}
    # an earlier version's temp folder (no pid in its name) is removed too
    (tmp_path / ".ck.tmp-0123456789ab").mkdir()
    ckpt.save_quantized(new, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck", "kill.py"]
