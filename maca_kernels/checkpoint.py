"""Save and load GPTQ-quantized Hugging Face causal LMs as safetensors checkpoints.

A quantized model is a transformers causal LM in which some ``nn.Linear`` modules were replaced by
:class:`~maca_kernels.QuantLinear` and whose ``config.quantization_config`` is a dict in the GPTQ
convention (see :func:`quantization_config`). The folder written by :func:`save_quantized` is the
layout that transformers (+ optimum + gptqmodel), GPTQModel and vLLM read:

- ``config.json`` with ``quantization_config``; ``generation_config.json`` and the tokenizer files
  when available;
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` above ``max_shard_size``; safetensors only, never pickle;
- per quantized module ``<name>.qweight`` int32 ``[K·bits/32, N]``, ``<name>.qzeros`` int32
  ``[G, N·bits/32]``, ``<name>.scales`` fp16 ``[G, N]``, ``<name>.g_idx`` int32 ``[K]`` and
  ``<name>.bias`` fp16 ``[N]`` if the layer has one;
- every other tensor in the dtype it has in the model (lossless; GPTQ readers cast floating tensors
  to the dtype they load with, as ``from_pretrained(dtype=...)`` does for any checkpoint). Tied
  weights are stored once (the transformers convention).

Writes are atomic: everything goes to a hidden temporary sibling folder, every file and the folder
are fsynced, and only then is the folder moved into place (an existing checkpoint is exchanged with it
in one ``renameat2`` at the very end). An interruption leaves the previous folder untouched, and the
next save removes the temporary folder it left. Nothing that save_quantized did not write is ever
deleted: it writes only into a new or empty folder, or over a checkpoint it wrote before (listed in
``maca_kernels_files.json``) when asked to (``overwrite=True``); other entries in that folder are kept.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from ._fsync import fsync_dir as _fsync_dir
from ._fsync import fsync_file as _fsync_file
from .formats.gptq import CHECKPOINT_FORMATS as _FORMATS
from .formats.gptq import check_bits
from .nn.quant_linear import QuantLinear, checkpoint_qweights_on

__all__ = ["check_out_dir", "load_quantized", "quantization_config", "save_quantized"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
OWN_FILES = "maca_kernels_files.json"  # the entries save_quantized wrote: only those are ever replaced
QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("maca_kernels")
    except PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


# ----------------------------------------------------------------------------------------------
# quantization_config


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str = "gptq",
                        meta: dict | None = None, *, static_groups: bool = False, damp_percent: float | None = None,
                        true_sequential: bool = True, lm_head: bool = False, mse: bool = False) -> dict:
    """The ``quantization_config`` dict that GPTQ readers expect in ``config.json``.

    Fields read at load time: ``quant_method`` ("gptq": selects the GPTQ quantizer in transformers),
    ``bits``, ``group_size`` (−1: one group per row), ``desc_act`` (act-order: ``g_idx`` is not
    ``k // group_size``; kernels that ignore ``g_idx`` are then refused), ``sym``, ``checkpoint_format``
    and ``format`` (both spell the zero convention: transformers' ``GPTQConfig`` reads ``format`` and
    accepts ``checkpoint_format`` as its legacy alias; GPTQModel reads either; "gptq" = v1, zeros stored
    minus one; "gptq_v2" = true zeros), ``pack_dtype`` ("int32": GPTQModel can pack into other integer
    widths), ``lm_head`` (whether the output head is quantized). ``true_sequential``, ``damp_percent``,
    ``static_groups``, ``mse`` and ``act_group_aware`` describe how the weights were made (no effect on
    loading); transformers takes ``true_sequential``/``damp_percent``/``act_group_aware`` at the top level,
    GPTQModel keeps them in ``meta``, so they are written in both places. ``act_group_aware`` is False
    (no GAR ordering: transformers' default would otherwise claim True). ``meta.quantizer`` lists the
    producer as ``"maca_kernels:<version>"`` (GPTQModel's ``tool:version`` convention).
    """
    bits = check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"group_size must be a positive int or -1, got {group_size!r}")
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"checkpoint_format must be one of {_FORMATS}, got {checkpoint_format!r}")
    if damp_percent is not None and not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must lie in (0, 1) (transformers' GPTQConfig refuses others), "
                         f"got {damp_percent}")
    m = {"quantizer": [f"maca_kernels:{_version()}"]}
    m.update({"true_sequential": bool(true_sequential), "static_groups": bool(static_groups), "mse": bool(mse),
              "act_group_aware": False})
    if damp_percent is not None:
        m["damp_percent"] = float(damp_percent)
    if meta:
        extra = dict(meta)
        quantizer = extra.pop("quantizer", None)
        if quantizer is not None:
            m["quantizer"] += [q for q in ([quantizer] if isinstance(quantizer, str) else list(quantizer))
                               if q not in m["quantizer"]]
        m.update(extra)
    cfg = {
        "quant_method": "gptq",
        "bits": int(bits),
        "group_size": int(group_size),
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": bool(lm_head),
        "true_sequential": bool(true_sequential),
        "act_group_aware": False,
        "meta": m,
    }
    if damp_percent is not None:
        cfg["damp_percent"] = float(damp_percent)
    return cfg


def _read_qcfg(qcfg) -> tuple[int, int, str, bool]:
    """(bits, group_size, checkpoint_format, desc_act) from a config's quantization_config, checked."""
    if qcfg is None:
        raise ValueError("config has no quantization_config: this is not a GPTQ checkpoint "
                         "(set model.config.quantization_config = maca_kernels.quantization_config(...))")
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(qcfg)
    method = str(qcfg.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ValueError(f"quantization_config.quant_method must be 'gptq', got {method!r}")
    bits = check_bits(qcfg.get("bits"), " (quantization_config.bits)")
    group_size = qcfg.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"quantization_config.group_size must be a positive int or -1, got {group_size!r}")
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    if qcfg.get("format") is not None and qcfg.get("checkpoint_format") is not None and \
            qcfg["format"] != qcfg["checkpoint_format"]:
        raise ValueError(f"quantization_config: format = {qcfg['format']!r} and checkpoint_format = "
                         f"{qcfg['checkpoint_format']!r} disagree")
    if fmt not in _FORMATS:
        raise ValueError(f"quantization_config.checkpoint_format must be one of {_FORMATS}, got {fmt!r}")
    if str(qcfg.get("pack_dtype", "int32")).split(".")[-1] != "int32":
        raise ValueError(f"quantization_config.pack_dtype must be int32, got {qcfg.get('pack_dtype')!r}")
    if qcfg.get("dynamic"):
        raise ValueError("quantization_config.dynamic (per-module overrides) is not supported")
    return bits, group_size, fmt, bool(qcfg.get("desc_act", False))


# ----------------------------------------------------------------------------------------------
# save


def _parse_size(size) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '2GB', '500MiB', got {size!r}")
    unit = m.group(2)
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _dedupe_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the keys whose tensor is the same object as an earlier key's (tied weights), keeping the
    source side of the model's declared ties (e.g. ``model.embed_tokens.weight``, not ``lm_head.weight``)."""
    tied_targets = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = id(t)
        if key in seen:
            keep = seen[key]
            if keep in tied_targets and name not in tied_targets:  # keep the source, drop the target
                del out[keep]
                out[name] = t
                seen[key] = name
            continue
        seen[key] = name
        out[name] = t
    return out


def _collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, QuantLinear]]:
    qmods = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qmods:
        raise ValueError("the model holds no QuantLinear module: nothing quantized to save")
    with checkpoint_qweights_on("cpu"):  # an act-order layer's permuted qweight leaves the GPU one at a time
        state = _dedupe_tied(model, model.state_dict(keep_vars=True))
    tensors = {}
    for name, t in state.items():
        t = t.detach()
        if t.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device: materialise the model before saving")
        tensors[name] = t
    return tensors, qmods


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _shard_plan(entries: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names (in order, with their byte sizes) cut into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class _ShardWriter:
    """Writes a checkpoint's safetensors shards as the tensors arrive, each straight to its place in its file: the
    plan (names, dtypes and shapes, in order) fixes every file's header and offsets up front, so nothing waits
    in memory. Inside a file the tensors lie by element size, largest first (each aligned to its own size, as
    safetensors' own writer lays them out), then in arrival order. ``finish()`` writes the index (more than one
    shard) and returns the file names."""

    def __init__(self, folder: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int):
        self.folder = folder
        meta = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        nbytes = {n: torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                  for n, (dtype, shape) in meta.items()}
        self.total = sum(nbytes.values())
        self.plan = _shard_plan([(n, nbytes[n]) for n, _, _ in entries], max_bytes)
        k = len(self.plan)
        self.names = [SAFE_WEIGHTS_NAME] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.order = [name for shard in self.plan for name in shard]
        self.place: dict[str, tuple[int, int]] = {}  # name -> (shard, byte offset in the file)
        self.headers: list[bytes] = []
        for i, shard in enumerate(self.plan):
            layout = sorted(shard, key=lambda n: -torch.empty(0, dtype=meta[n][0]).element_size())  # stable
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for n in layout:
                dtype, shape = meta[n]
                header[n] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                             "data_offsets": [offset, offset + nbytes[n]]}
                offset += nbytes[n]
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            self.headers.append(len(text).to_bytes(8, "little") + text)
            start = len(self.headers[-1])
            for n in layout:
                self.place[n] = (i, start + header[n]["data_offsets"][0])
        self.left = [len(shard) for shard in self.plan]
        self.files: dict[int, object] = {}
        self.next = 0
        self.meta = meta

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.next >= len(self.order) or name != self.order[self.next]:
            want = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise RuntimeError(f"checkpoint writer: got {name!r}, expected {want!r}")
        if (t.dtype, tuple(t.shape)) != self.meta[name]:
            raise RuntimeError(f"checkpoint writer: {name!r} is {t.dtype} {tuple(t.shape)}, planned "
                               f"{self.meta[name][0]} {self.meta[name][1]}")
        i, offset = self.place[name]
        if i not in self.files:
            f = self.files[i] = open(self.folder / self.names[i], "wb")  # noqa: SIM115 - closed when the shard is full
            f.write(self.headers[i])
        f = self.files[i]
        f.seek(offset)
        f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1
        self.left[i] -= 1
        if not self.left[i]:
            f.close()
            _fsync_file(self.folder / self.names[i])
            del self.files[i]

    def finish(self) -> list[str]:
        if self.next != len(self.order):
            raise RuntimeError(f"checkpoint writer: {len(self.order) - self.next} tensors never arrived, first "
                               f"{self.order[self.next]!r}")
        if len(self.names) > 1:
            where = {k: fname for fname, shard in zip(self.names, self.plan, strict=True) for k in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": where}
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            _fsync_file(self.folder / SAFE_WEIGHTS_INDEX_NAME)
        return self.names

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    writer = _ShardWriter(folder, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], max_bytes)
    try:
        for name, t in tensors.items():
            writer.add(name, t)
        return writer.finish()
    finally:
        writer.close()


def _check_model_against_config(qmods: dict[str, QuantLinear], qcfg: dict) -> None:
    bits, group_size, fmt, desc_act = _read_qcfg(qcfg)
    for name, m in qmods.items():
        if (m.bits, m.group_size, m.checkpoint_format) != (bits, group_size, fmt):
            raise ValueError(
                f"QuantLinear {name!r} has bits={m.bits}, group_size={m.group_size}, checkpoint_format="
                f"{m.checkpoint_format!r} but quantization_config says bits={bits}, group_size={group_size}, "
                f"checkpoint_format={fmt!r}: every quantized module must match the config")
        if not desc_act and m.act_order:
            raise ValueError(f"QuantLinear {name!r} has an act-order g_idx (not k // group_size) but "
                             "quantization_config.desc_act is False: readers may ignore g_idx; set desc_act=True")
    lm_head_quantized = any(n == "lm_head" or n.endswith(".lm_head") for n in qmods)
    if lm_head_quantized != bool(qcfg.get("lm_head", False)):
        raise ValueError(f"quantization_config.lm_head = {qcfg.get('lm_head', False)} but the lm_head is "
                         f"{'' if lm_head_quantized else 'not '}a QuantLinear")


def _own_files(folder: Path) -> set[str] | None:
    """The entries save_quantized wrote into ``folder`` (its manifest), or None if it wrote none there."""
    try:
        m = json.loads((folder / OWN_FILES).read_text())
        files = m["files"]
        if m.get("written_by") != "maca_kernels" or not all(isinstance(f, str) for f in files):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) | {OWN_FILES}


def check_out_dir(out_dir, overwrite: bool = False) -> Path:
    """Where ``save_quantized`` may write: a new or empty folder, or with ``overwrite`` a checkpoint it wrote
    before. Anything else raises FileExistsError and nothing of the user's is touched (a checkpoint that an
    interrupted save had moved aside is put back first). Call it before long work (the CLI does). Returns the
    folder's real path (a symlink is followed: the checkpoint goes where it points)."""
    out = Path(os.path.realpath(out_dir))
    cwd = Path(os.path.realpath(os.getcwd()))
    if out == cwd or out in cwd.parents:
        raise FileExistsError(f"out_dir {str(out)!r} is the working directory or holds it: the save replaces the "
                              "folder whole, which would pull it from under this process; choose another folder")
    if out.parent.is_dir():
        _remove_stale_temps(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a folder")
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    if not entries:
        return out
    if _own_files(out) is None:
        what = ("a checkpoint that lists no files written by save_quantized (no maca_kernels_files.json: another "
                "tool's, or an earlier version's)" if (out / "config.json").exists() else "no checkpoint written by "
                "save_quantized")
        raise FileExistsError(f"out_dir {str(out)!r} is not empty and holds {what} "
                              f"({entries[:5]}{' …' if len(entries) > 5 else ''}): refusing to write there; choose a "
                              "new or empty folder")
    if not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} holds a checkpoint: pass overwrite=True (CLI: --overwrite) to "
                              "replace it")
    return out


_TEMP = r"\.{name}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{12}}"  # no pid: left by an earlier version


_ACTIVE: set[Path] = set()  # this process's temp folders in use (others of this pid were left by an interruption)


def _temp_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(m: re.Match, p: Path) -> bool:
    if m.group(2) is None:
        return True
    pid = int(m.group(2))
    return not _alive(pid) or (pid == os.getpid() and p not in _ACTIVE)


def _remove_stale_temps(out: Path) -> None:
    """What a killed save left beside ``out``: its hidden temp folders (a whole checkpoint each; the user's files
    in them are hard links of those in ``out``). A replacement killed between its two renames (no renameat2)
    left ``out`` missing or empty: the previous checkpoint is put back instead."""
    pattern = re.compile(_TEMP.format(name=re.escape(out.name)))
    stale = sorted((p for p in out.parent.iterdir() if (m := pattern.fullmatch(p.name)) and _stale(m, p)),
                   key=lambda p: ".old-" not in p.name)  # the moved-aside checkpoint first
    for p in stale:
        if ".old-" in p.name:
            if not out.exists() or (out.is_dir() and not any(out.iterdir())):
                if out.exists():
                    out.rmdir()
                os.rename(p, out)
                continue
            if _own_files(out) is None:  # out holds something else now: keep the old checkpoint where it is
                warnings.warn(f"kept {p}: a checkpoint an interrupted save moved aside ({out} holds other files)",
                              stacklevel=3)
                continue
        shutil.rmtree(p, ignore_errors=True)


def _link_into(src: Path, dst: Path) -> None:
    """Hard links (symlinks copied, folders recreated): ``dst`` shares the user's data without copying it."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for child in src.iterdir():
            _link_into(child, dst / child.name)
    else:
        os.link(src, dst)


def _keep_foreign(out: Path, tmp: Path) -> set[str]:
    """Link the entries of the existing ``out`` that save_quantized did not write into the new folder ``tmp``."""
    own = _own_files(out) or set()
    foreign = sorted(set(os.listdir(out)) - own)
    for name in foreign:
        if (tmp / name).exists():
            raise FileExistsError(f"{out / name} was not written by save_quantized and the new checkpoint has a file "
                                  "of that name: move it away first")
        try:
            _link_into(out / name, tmp / name)
        except OSError as e:
            raise FileExistsError(f"cannot keep {out / name} (not written by save_quantized) in the replaced "
                                  f"checkpoint ({e}): move it away first") from None
    return set(foreign)


def _discard_old(old: Path, out: Path, linked: set[str]) -> None:
    """Remove the replaced checkpoint: its own files, and what was linked into the new one. Anything else (it
    appeared after the links were made) is moved into ``out`` or, on a name clash, left where it is."""
    own = _own_files(old) or set()
    for p in old.iterdir():
        if p.name in own or p.name in linked:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif not os.path.lexists(out / p.name):
            os.rename(p, out / p.name)
    try:
        old.rmdir()
    except OSError:
        warnings.warn(f"left {old}: it holds entries that save_quantized did not write and {out} already has",
                      stacklevel=3)


def _commit(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` (absent, empty, or a checkpoint of ours whose foreign
    entries are kept): one atomic exchange where the OS has it."""
    if not out.exists():
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    try:
        linked = _keep_foreign(out, tmp)
        shutil.copystat(out, tmp)  # the folder keeps its mode
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the new files and links only: out is untouched
        raise
    if _exchange(tmp, out):  # tmp now holds the old folder
        old = tmp
    else:
        old = _temp_name(out, "old")
        _ACTIVE.add(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            _ACTIVE.discard(old)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_dir(out.parent)
    try:
        _discard_old(old, out, linked)
    finally:
        _ACTIVE.discard(old)


def save_quantized(model: nn.Module, out_dir, tokenizer=None, max_shard_size="2GB", overwrite: bool = False) -> Path:
    """Write ``model`` (a transformers causal LM holding QuantLinear modules) to ``out_dir`` as a GPTQ
    safetensors checkpoint; atomic (see the module docstring). ``out_dir`` must be new, empty, or (with
    ``overwrite=True``) a checkpoint written here before: then only the files it wrote are replaced, and
    anything else in the folder is kept. Returns the folder's path."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError("model must be a transformers PreTrainedModel (it needs .config)")
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict):
        if qcfg is not None and hasattr(qcfg, "to_dict"):
            qcfg = qcfg.to_dict()
        else:
            _read_qcfg(None)
    max_bytes = _parse_size(max_shard_size)
    tensors, qmods = _collect(model)
    _check_model_against_config(qmods, qcfg)

    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return write_checkpoint(out_dir, config, qcfg, "lm_head" in qmods, float_dtypes,
                            getattr(model, "generation_config", None), tokenizer,
                            lambda tmp: _write_shards(tensors, tmp, max_bytes), overwrite)


def write_checkpoint(out_dir, config, qcfg: dict, quantized_head: bool, float_dtypes: set, generation_config,
                     tokenizer, write_tensors, overwrite: bool = False) -> Path:
    """The folder around the tensors, atomically (see the module docstring): config (with ``qcfg``, untied head if
    ``quantized_head``, dtype from ``float_dtypes`` less fp16), generation config, tokenizer, the tensors that
    ``write_tensors(folder)`` writes, the list of own files; shared by save_quantized and the streamed pipeline."""
    out_dir = check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out_dir, "tmp")
    tmp.mkdir()
    _ACTIVE.add(tmp)
    try:
        write_tensors(tmp)  # first: a streamed run completes qcfg (e.g. the experts' routing counts) as it goes
        cfg = copy.deepcopy(config)
        cfg.quantization_config = copy.deepcopy(qcfg)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if quantized_head and getattr(text_cfg, "tie_word_embeddings", False):
            text_cfg.tie_word_embeddings = False  # a quantized head cannot share the embedding matrix
        float_dtypes = set(float_dtypes) - {torch.float16}
        if len(float_dtypes) == 1:  # the model's dtype (QuantLinear scales/bias are fp16 whatever it is)
            cfg.dtype = next(iter(float_dtypes))
        elif not float_dtypes:
            cfg.dtype = torch.float16
        cfg.save_pretrained(tmp)
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        (tmp / OWN_FILES).write_text(json.dumps({"written_by": "maca_kernels", "files": written}, indent=1) + "\n")
        mode = stat.S_IMODE((tmp / "config.json").stat().st_mode)  # safetensors creates its files 0600
        for p in tmp.iterdir():
            if p.is_file():
                os.chmod(p, mode)
                _fsync_file(p)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _ACTIVE.discard(tmp)
        raise
    try:
        _commit(tmp, out_dir)
    finally:
        _ACTIVE.discard(tmp)
    return out_dir


# ----------------------------------------------------------------------------------------------
# load


def _read_index(path: Path) -> dict[str, list[str]]:
    """file name → keys it holds, from the index (or the single file); checked for consistency."""
    from safetensors import safe_open

    idx = path / SAFE_WEIGHTS_INDEX_NAME
    if idx.exists():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{idx}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (path / SAFE_WEIGHTS_NAME).exists():
        weight_map, files = None, [SAFE_WEIGHTS_NAME]
    else:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}{hint}")
    out: dict[str, list[str]] = {}
    for fname in files:
        if Path(fname).name != fname or not fname.endswith(".safetensors"):
            raise ValueError(f"{idx}: shard name {fname!r} must be a .safetensors file in the checkpoint folder")
        f = path / fname
        if not f.exists():
            raise FileNotFoundError(f"shard {fname!r} named by {SAFE_WEIGHTS_INDEX_NAME} is missing in {path}")
        try:
            with safe_open(str(f), framework="pt") as sf:
                out[fname] = list(sf.keys())
        except Exception as e:  # safetensors raises its own error types on a corrupt header
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    seen: dict[str, str] = {}
    for fname, keys in out.items():
        for k in keys:
            if k in seen:
                raise ValueError(f"tensor {k!r} is stored twice (in {seen[k]} and {fname})")
            seen[k] = fname
            if weight_map is not None and weight_map.get(k) != fname:
                raise ValueError(f"tensor {k!r} is in {fname} but the index maps it to {weight_map.get(k)!r}")
    if weight_map is not None:
        lost = sorted(k for k in weight_map if k not in seen)
        if lost:
            raise ValueError(f"tensors listed in the index but absent from their shard: {lost[:5]}")
    return out


def _header(path: Path, files: dict[str, list[str]]) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    from safetensors import safe_open

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    meta = {}
    for fname, keys in files.items():
        with safe_open(str(path / fname), framework="pt") as sf:
            for k in keys:
                sl = sf.get_slice(k)
                d = sl.get_dtype()
                if d not in dtypes:
                    raise ValueError(f"tensor {k!r} in {fname} has unsupported dtype {d}")
                meta[k] = (tuple(sl.get_shape()), dtypes[d], fname)
    return meta


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _experts_in_place(model: nn.Module, qnames: list[str]) -> None:
    """A fused-experts module (transformers 5) whose experts the checkpoint stores one by one
    (``experts.{e}.gate_proj.qweight`` ...) becomes ``Experts`` with a place for each expert's modules."""
    from .nn.experts import Experts
    from .pipeline.experts import FusedExperts, fused_module_of

    for parent in sorted({f for f in (fused_module_of(model, n) for n in qnames) if f is not None}):
        ex = FusedExperts(parent, model.get_submodule(parent))
        _set_module(model, parent, Experts.skeleton(ex.num_experts, ex.hidden, ex.intermediate, ex.act()))


def load_quantized(path, device="cpu", dtype: torch.dtype = torch.float16) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (or any GPTQ safetensors checkpoint with the same
    layout) from ``path``: the architecture from ``config.json`` (nothing is downloaded), QuantLinear in
    place of every Linear that has ``.qweight`` entries, every tensor's shape and dtype checked against
    the config before anything is loaded (ValueError naming the tensor), weights read with safetensors
    only. Floating non-quantized tensors are cast to ``dtype``; scales and bias stay fp16. Returns the
    model on ``device`` in eval mode."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    files = _read_index(path)  # before building the model: a missing or corrupt file fails fast
    header = _header(path, files)
    with _offline():
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    qcfg = getattr(config, "quantization_config", None)
    bits, group_size, fmt, _ = _read_qcfg(qcfg)

    # from_config would see quantization_config and may hand the model to a quantizer: build without it
    config.quantization_config = None
    with _offline():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.quantization_config = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()

    qnames = sorted({k[: -len(".qweight")] for k in header if k.endswith(".qweight")})
    _experts_in_place(model, qnames)
    for name in qnames:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"unexpected tensor {name + '.qweight'!r}: the model has no module {name!r}") from None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"tensor {name + '.qweight'!r}: module {name!r} is {type(lin).__name__}, not Linear")
        K, N = lin.in_features, lin.out_features
        if group_size != -1 and K % group_size:
            raise ValueError(f"module {name!r}: in_features = {K} is not divisible by group_size = {group_size}")
        if (K * bits) % 32 or (N * bits) % 32:
            raise ValueError(f"module {name!r}: K = {K}, N = {N} cannot be packed at bits = {bits}")
        _set_module(model, name, QuantLinear(K, N, bits, group_size, bias=lin.bias is not None,
                                             checkpoint_format=fmt, device="meta"))

    # expected tensors: the state_dict of the rebuilt model, tied weights counted once
    full = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for k, t in full.items():
        groups.setdefault(id(t), []).append(k)
    missing = []
    for names in groups.values():
        if not any(n in header for n in names):
            missing.append(names[0])
    unexpected = sorted(k for k in header if k not in full)
    if missing:
        raise ValueError(f"checkpoint is missing tensors {missing[:10]}{' …' if len(missing) > 10 else ''}")
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensors {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
    for k, (shape, got_dtype, fname) in header.items():
        want = full[k]
        if shape != tuple(want.shape):
            raise ValueError(f"tensor {k!r} in {fname} has shape {shape}, expected {tuple(want.shape)} "
                             f"(bits={bits}, group_size={group_size})")
        if want.dtype in (torch.int32, torch.float16) and k.rpartition(".")[0] in qnames:
            ok = got_dtype == want.dtype or (k.endswith(".bias") and got_dtype in _FLOAT_DTYPES)
        elif want.is_floating_point():
            ok = got_dtype in _FLOAT_DTYPES
        else:
            ok = got_dtype == want.dtype
        if not ok:
            raise ValueError(f"tensor {k!r} in {fname} has dtype {got_dtype}, expected {want.dtype}")

    tensors: dict[str, torch.Tensor] = {}
    for fname, keys in files.items():
        with safe_open(str(path / fname), framework="pt") as sf:
            for k in keys:
                tensors[k] = sf.get_tensor(k)
    for name in qnames:
        layer = QuantLinear.from_checkpoint({s: tensors.pop(f"{name}.{s}") for s in QUANT_KEYS
                                             if f"{name}.{s}" in tensors}, bits, group_size, fmt)
        _set_module(model, name, layer)
    # tied keys absent from the file: the model's tie already points them at the stored tensor
    result = model.load_state_dict(tensors, strict=False)
    absent = [k for k in result.missing_keys if not any(n in tensors for n in groups[id(full[k])])
              and k.rpartition(".")[0] not in qnames]
    if absent or result.unexpected_keys:
        raise ValueError(f"state mismatch after load: missing {absent[:5]}, unexpected {result.unexpected_keys[:5]}")
    gen_file = path / "generation_config.json"
    if gen_file.exists():
        with _offline():
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval()


@contextlib.contextmanager
def _offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

