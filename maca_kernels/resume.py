"""The resumable state of ``quantize_model``: one commit point per finished layer.

A ``resume_dir`` holds
- ``layer_{i:04d}.safetensors``: layer i's quantized tensors (codes, scales, zeros, g_idx per module);
- ``streams_{i:04d}_{s:04d}.safetensors``: virtual shard s's inputs of layer i + 1 (the quantized stream, and
  GPTAQ's float one), written by the rank that runs the shard;
- ``progress.json``: the manifest, replaced last by an atomic rename. It names every file of the state with
  its sha256, and holds the run's fingerprint (settings, calibration tokens, config, the weights outside the
  decoder layers) and a hash of each finished layer's float weights. With several ranks (one folder that every rank
sees), rank 0 writes the manifest once every rank's files of the layer are written and their hashes gathered.

The manifest is the only commit point: a file it does not name (half written by a kill, the streams of an
earlier layer) is never read, and is removed at the next commit. Files it names are checked against their
hashes, shapes and the model before they are used; a damaged folder raises ``ResumeError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

import torch
from torch import nn

from ._fsync import fsync_dir

MANIFEST = "progress.json"
FORMAT = 4  # 2: one streams file per layer; 3: without the experts' routing counts
_OURS = re.compile(r"(progress\.json|layer_\d{4}\.safetensors|streams_\d{4}(_\d{4})?\.safetensors|\..*\.tmp.*)")


class ResumeError(ValueError):
    """The resume folder is damaged, foreign, or holds another run."""


def tensors_hash(named: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (a value may be a function giving the tensor:
    read when its turn comes)."""
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name]
        t = (t() if callable(t) else t).detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def module_hash(module: nn.Module) -> str:
    return tensors_hash(dict(module.state_dict()))


def _sha256(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


_MANIFEST_TYPES = {"format": int, "fingerprint": str, "settings": dict, "done_layers": int, "modules": dict,
                   "experts": dict, "files": dict, "layer_hashes": list}


def _check_manifest(m) -> None:
    """Every key with the type this module writes (ValueError otherwise): what follows can index it safely."""
    if not isinstance(m, dict):
        raise ValueError(f"expected a JSON object, got {type(m).__name__}")
    for k, t in _MANIFEST_TYPES.items():
        if k not in m:
            raise ValueError(f"missing key {k!r}")
        if not isinstance(m[k], t) or isinstance(m[k], bool):
            raise ValueError(f"{k!r} is a {type(m[k]).__name__}, expected a {t.__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m["files"].items()):
        raise ValueError("'files' must map file names to sha256 strings")
    if not all(isinstance(h, str) for h in m["layer_hashes"]):
        raise ValueError("'layer_hashes' must hold strings")
    if not all(isinstance(v, dict) for v in m["modules"].values()):
        raise ValueError("'modules' must map module names to their settings")


class ResumeDir:
    """Reads and commits the state in ``path`` for the run identified by ``fingerprint``."""

    def __init__(self, path: str, fingerprint: str, settings: dict) -> None:
        self.path, self.fingerprint, self.settings = str(path), fingerprint, settings
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ResumeError(f"resume_dir {self.path} exists and is not a folder")
        if os.path.isdir(self.path):
            foreign = sorted(n for n in os.listdir(self.path) if not _OURS.fullmatch(n))
            if "streams.safetensors" in foreign:
                raise ResumeError(f"resume_dir {self.path} was written by an earlier version of maca_kernels (one "
                                  "streams.safetensors): delete the folder to restart from the first layer")
            if foreign:
                raise ResumeError(f"resume_dir {self.path} holds files quantize_model did not write ({foreign[:5]}): "
                                  "use an empty or new folder")
        self.manifest: dict | None = None

    def _error(self, fname: str, what: str) -> ResumeError:
        return ResumeError(f"resume_dir {self.path}: {fname} {what}; delete the folder to restart from the first "
                           "layer")

    # -- reading -----------------------------------------------------------------------------------------------
    def read_manifest(self, layer_hashes: list[str] | None = None) -> dict | None:
        """The committed manifest of this run (None if nothing is committed yet). ``layer_hashes``: the model's
        layer weights, checked against the finished layers'. Refuses another run's state with the difference."""
        p = os.path.join(self.path, MANIFEST)
        if not os.path.exists(p):
            return None
        try:
            with open(p) as f:
                m = json.load(f)
            _check_manifest(m)
        except (OSError, ValueError) as e:
            raise self._error(MANIFEST, f"is unreadable or incomplete ({e})") from None
        if m["format"] != FORMAT:
            raise self._error(MANIFEST, f"has format {m['format']!r}, this version writes {FORMAT}")
        if m["fingerprint"] != self.fingerprint:
            now = json.loads(json.dumps(self.settings, default=str))
            diff = {k: (m["settings"].get(k), v) for k, v in now.items() if m["settings"].get(k) != v}
            hint = (" (cpu_threads: the torch threads per process, which decide a CPU run's bits: set OMP_NUM_THREADS "
                    "as the first run had)" if "cpu_threads" in diff else "")
            raise ResumeError(f"resume_dir {self.path} holds a run with other arguments "
                              f"({diff or 'same settings; other calibration data or model weights'}){hint}: refusing "
                              "to resume; use another folder or delete it")
        done = m["done_layers"]
        if not 0 <= done <= len(m["layer_hashes"]):
            raise self._error(MANIFEST, f"has done_layers = {done!r} for {len(m['layer_hashes'])} layer hashes")
        if layer_hashes is not None:
            if done > len(layer_hashes):
                raise self._error(MANIFEST, f"has {done} finished layers, the model {len(layer_hashes)}")
            for i in range(done):
                if m["layer_hashes"][i] != layer_hashes[i]:
                    raise ResumeError(f"resume_dir {self.path}: layer {i} was quantized from other weights than this "
                                      "model's: refusing to resume; use another folder or delete it")
        self.manifest = m
        return m

    def load(self, fname: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """A file named by the manifest, checked against its sha256."""
        from safetensors.torch import load_file

        want = (self.manifest or {}).get("files", {}).get(fname)
        p = os.path.join(self.path, fname)
        if want is None:
            raise self._error(fname, "is not named by progress.json")
        if not os.path.exists(p):
            raise self._error(fname, "is missing")
        if file_sha256(p) != want:
            raise self._error(fname, "does not match the hash progress.json holds (truncated or changed)")
        try:
            return load_file(p, device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise self._error(fname, f"is not a readable safetensors file ({e})") from None

    def check(self, fname: str, tensors: dict[str, torch.Tensor], want: dict[str, tuple]) -> None:
        """Every key of ``want`` present in ``tensors`` with the shape ``want`` gives."""
        for k, shape in want.items():
            if k not in tensors:
                raise self._error(fname, f"has no tensor {k!r}")
            if tuple(tensors[k].shape) != tuple(shape):
                raise self._error(fname, f"has {k!r} of shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")

    # -- committing --------------------------------------------------------------------------------------------
    def _write(self, fname: str, tensors: dict[str, torch.Tensor]) -> str:
        from safetensors.torch import save_file

        tmp = os.path.join(self.path, f".{fname}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:  # one read: the hash, then the fsync of the same file
            digest = _sha256(f)
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, fname))
        return digest

    def commit(self, layer: int, layer_tensors: dict[str, torch.Tensor] | None, streams: dict[str, dict],
               layer_hashes: list[str], modules: dict, world=None, experts: dict | None = None) -> None:
        """Write layer ``layer``'s files under new names (``layer_tensors`` on rank 0, each rank its ``streams``:
        file name -> tensors), then the manifest naming them (the commit point, rank 0), then remove what the
        manifest no longer names. ``world`` (pipeline/world.py): the ranks, None for this process alone. ``experts``:
        the fused-experts modules' routing counts and policy so far (QuantizeStats.experts)."""
        os.makedirs(self.path, exist_ok=True)
        rank = 0 if world is None else world.rank
        mine = {fname: self._write(fname, tensors) for fname, tensors in streams.items()}
        if rank == 0:
            mine[f"layer_{layer:04d}.safetensors"] = self._write(f"layer_{layer:04d}.safetensors", layer_tensors)
        every = [mine] if world is None else world.gather_objects(mine)
        if rank != 0:
            return
        files = dict((self.manifest or {}).get("files", {}))
        files = {k: v for k, v in files.items() if not k.startswith("streams_")}
        for part in every:
            files.update(part)
        manifest = dict(format=FORMAT, fingerprint=self.fingerprint,
                        settings=json.loads(json.dumps(self.settings, default=str)), done_layers=layer + 1,
                        modules=modules, experts=experts or {}, layer_hashes=layer_hashes[: layer + 1], files=files)
        fsync_dir(self.path)  # the files' names are durable before the manifest names them
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{MANIFEST}.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, MANIFEST))
        fsync_dir(self.path)
        self.manifest = manifest
        for name in os.listdir(self.path):  # only our own names (the folder holds nothing else)
            if name != MANIFEST and name not in files and _OURS.fullmatch(name):
                os.remove(os.path.join(self.path, name))
