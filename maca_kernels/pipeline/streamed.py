"""Disk to disk: ``quantize_folder`` quantizes a Hugging Face model folder into a GPTQ checkpoint folder without
ever holding the whole model. The model is built on the meta device; what lies outside the decoder layers
(embeddings, final norm, head, rotary tables) is read from the safetensors shards; each decoder layer is read
(memory-mapped, then cast to ``dtype``) when the pipeline reaches it, quantized, its packed tensors and other
weights written to the output shards in order, and released. The pipeline is ``quantize_model``'s own
(run.py: the same checks, calibration shards, solves, resume state, ranks), so the checkpoint is bit for bit
the one that ``quantize_model`` on the loaded model followed by ``save_quantized`` writes, with the same
arguments and ``dtype``; only the shard being filled waits in memory. Under ``torchrun`` every rank reads the
layers it runs from the same folder and rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import SAFE_WEIGHTS_INDEX_NAME as INDEX
from ..checkpoint import SAFE_WEIGHTS_NAME as SINGLE
from ..checkpoint import _dedupe_tied, _parse_size, _ShardWriter, check_out_dir, write_checkpoint
from ..nn import QuantLinear
from ..nn.experts import Experts
from .experts import make_room
from .model import decoder_layers, module_settings, swap
from .run import _moe_meta, _peak_memory_mb, _prepare, _run, _say, _targets, quantize_model
from .world import World


class ShardReader:
    """The tensors of a model folder's safetensors files, each read when asked for (memory-mapped)."""

    def __init__(self, folder: Path):
        index = folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: folder / f for k, f in weight_map.items()}
        elif (folder / SINGLE).exists():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE), framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), folder / SINGLE)
        else:
            raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX} (quantize_folder reads safetensors only)")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get_many(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed after: its mapping would otherwise keep every page
        read so far resident (what makes the peak grow with the depth)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k).clone()  # its own memory, not the file's pages
        return out

    def float_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating tensors (the first one found)."""
        from safetensors import safe_open

        for path in dict.fromkeys(self.where.values()):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(
                        f.get_slice(name).get_dtype())
                    if dtype is not None:
                        return dtype
        raise ValueError("the checkpoint holds no floating tensor")


def _load_into(module: nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype, device, skip: str = "",
               only: set | None = None) -> None:
    """``module``'s parameters and persistent buffers from the checkpoint (names ``prefix + key``; keys starting
    with ``skip`` left alone, and any not in ``only`` if given), in place of its meta tensors; floating ones cast
    to ``dtype``."""
    want = {key: t for key, t in module.state_dict(keep_vars=True).items()
            if not (skip and key.startswith(skip)) and (only is None or key in only) and prefix + key in reader}
    read = reader.get_many([prefix + key for key in want])
    state = {}
    for key, t in want.items():
        name = prefix + key
        v = read.pop(name)
        if tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"{name}: the checkpoint holds {tuple(v.shape)}, the model expects {tuple(t.shape)}")
        state[key] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    module.load_state_dict(state, strict=False, assign=True)


def _skeleton(folder: Path, reader: ShardReader, dtype: torch.dtype, device):
    """The model on the meta device with everything outside its decoder layers real: read from the checkpoint,
    or computed as transformers computes it (rotary tables and other non-persistent buffers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{folder} is already quantized (config.json has quantization_config)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers_name, layers = decoder_layers(model)
    inside = layers_name + "."
    for name, module in model.named_modules():
        if name == layers_name or name.startswith(inside):
            continue
        if module._non_persistent_buffers_set:  # rotary tables, embedding scales: what from_pretrained computes
            module.to_empty(device=device, recurse=False)  # (its parameters are then read over the init's)
            model._init_weights(module)
    # what the pipeline's forward passes (which stop at the first layer) need; the parameters registered after
    # the layers (final norm, an untied head: for a 128k vocabulary a GB or more) are read when written
    keys = list(model.state_dict(keep_vars=True))
    last = max(i for i, k in enumerate(keys) if k.startswith(inside))
    _load_into(model, "", reader, dtype, device, skip=inside, only=set(keys[:last]))
    model.tie_weights()  # a head tied to the embeddings follows the loaded embeddings
    missing = _absent(model, reader)
    if missing:
        raise ValueError(f"{folder}: the model's tensors {missing[:3]} are not in its checkpoint under these names "
                         "(transformers renames or fuses some checkpoints' tensors while loading, e.g. MoE experts): "
                         "load it with from_pretrained and use quantize_model")
    return model.eval(), config


def unstreamable(model_dir) -> str | None:
    """Why ``quantize_folder`` cannot read this folder (None if it can): safetensors whose tensor names are the
    model's own. transformers renames or fuses some checkpoints' tensors while loading (e.g. the per-expert
    weights of MoE checkpoints into fused 3-D experts); those need ``from_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_dir)
    try:
        reader = ShardReader(folder)
    except FileNotFoundError as exc:
        return str(exc)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    missing = _absent(model, reader)
    return f"tensors {missing[:3]} are not in the checkpoint under these names" if missing else None


def _absent(model: nn.Module, reader: ShardReader) -> list[str]:
    """The model's tensors that are neither real nor in the checkpoint (a head tied to the embeddings is neither
    missing nor read: it follows them)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return [n for n, t in model.state_dict().items() if t.is_meta and n not in reader and n not in tied]


class _LayerLoader:
    """Layer i with its weights, read when asked for; the layer asked for last is kept (the pipeline asks for it
    more than once), the one before is released."""

    def __init__(self, reader: ShardReader, layers_name: str, layers: nn.ModuleList, dtype, device):
        self.reader, self.layers_name, self.layers, self.dtype, self.device = reader, layers_name, layers, dtype, device
        self.index, self.layer, self.load_s = None, None, 0.0

    def __call__(self, i: int) -> nn.Module:
        if self.index != i:
            self.layer = None  # released before the next is read
            t0 = time.perf_counter()
            layer = copy.deepcopy(self.layers[i])  # meta: structure only
            _load_into(layer, f"{self.layers_name}.{i}.", self.reader, self.dtype, self.device)
            left = [n for n, t in layer.state_dict().items() if t.is_meta]
            if left or any(b is not None and b.is_meta for b in layer.buffers()):
                raise ValueError(f"layer {i}: tensors not in the checkpoint: {left[:5] or 'non-persistent buffers'}")
            self.index, self.layer = i, layer.eval()
            self.load_s += time.perf_counter() - t0
        return self.layer


def _trim_heap() -> None:
    """Give the freed heap back to the system (glibc's malloc_trim; nothing elsewhere). After the first large free,
    glibc serves allocations of up to 32 MB from the heap, and a finished layer's freed tensors would otherwise
    stay resident and raise the peak with every layer."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _plan(config, dtype, job) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor) of every tensor of the quantized checkpoint, in save_quantized's order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    o = job.opts
    for i, layer in enumerate(job.layers):
        prefix = f"{job.layers_name}.{i}."
        mods, experts = _targets(layer, o["keep_float"], prefix)
        for name, ex in ((n, ex) for n, ex in experts.items() if ex.fused):  # a place for each expert's modules
            swap(model, prefix + name, Experts.skeleton(ex.num_experts, ex.hidden, ex.intermediate, ex.act()))
        for name, lin in mods.items():
            s = module_settings(prefix + name, job.base, o["overrides"])
            q = QuantLinear(lin.in_features, lin.out_features, s["bits"], s["group_size"], bias=lin.bias is not None,
                            checkpoint_format=o["checkpoint_format"], device="meta")
            swap(model, prefix + name, q)
    return list(_dedupe_tied(model, model.state_dict(keep_vars=True)).items())


def quantize_folder(model_dir, out_dir, calib, bits: int = 4, group_size: int = 128, *,
                    dtype: torch.dtype | None = None, tokenizer=None, max_shard_size="2GB", overwrite: bool = False,
                    **options) -> Path:
    """Quantize the model in ``model_dir`` (a Hugging Face folder of safetensors) into the GPTQ checkpoint
    ``out_dir``, one decoder layer in memory at a time. ``dtype``: the model's compute and storage dtype (default:
    the checkpoint's); ``options``: ``quantize_model``'s (method, weighting, act_order, overrides, keep_float,
    device, resume_dir, ...). The checkpoint equals ``quantize_model`` on the model loaded with
    ``from_pretrained(model_dir, dtype=dtype)`` followed by ``save_quantized(..., tokenizer, max_shard_size)``,
    bit for bit. Under ``torchrun`` every rank calls it with the same arguments (the folders on a file system every
    rank sees, or a copy of the model folder at the same path on each machine); rank 0 writes ``out_dir``. Returns
    the folder; ``quantize_folder.last_stats`` holds the run's QuantizeStats (each rank's own)."""
    from transformers import GenerationConfig

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {folder}: no config.json (not a Hugging Face model folder)")
    out = World().on_rank0(lambda: check_out_dir(out_dir, overwrite))  # refused before any work, on every rank
    max_bytes = _parse_size(max_shard_size)
    reader = ShardReader(folder)
    dtype = dtype or reader.float_dtype()
    model, config = _skeleton(folder, reader, dtype, "cpu")
    opts = {k: p.default for k, p in inspect.signature(quantize_model).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}  # quantize_model's options and defaults
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"quantize_folder got unexpected options {sorted(unknown)}")
    opts.update(options)
    job = _prepare(model, calib, bits, group_size, opts)

    def late(name: str) -> torch.Tensor:  # a tensor outside the layers that the forward passes never needed
        t = reader.get_many([name])[name]
        return t.to(dtype) if t.is_floating_point() else t

    job.read = late
    loader = _LayerLoader(reader, job.layers_name, job.layers, dtype, "cpu")
    plan = _plan(config, dtype, job)
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:  # as from_pretrained makes it for a folder without one: from config.json
        generation = GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)
    real = _dedupe_tied(model, model.state_dict(keep_vars=True))
    inside = job.layers_name + "."

    def release(i: int, packed: dict) -> None:
        loader.index, loader.layer = None, None
        _trim_heap()

    def write(tmp: Path) -> None:
        writer = _ShardWriter(tmp, [(n, t.dtype, tuple(t.shape)) for n, t in plan], max_bytes)
        order = iter(n for n, _ in plan)
        pending = next(order, None)

        def emit_until_layer() -> None:  # what lies outside the layers, up to the next layer's tensors
            nonlocal pending
            while pending is not None and not pending.startswith(inside):
                t = real[pending]
                writer.add(pending, late(pending) if t.is_meta else t)  # read only now (see _skeleton)
                pending = next(order, None)

        def on_layer(i: int, packed: dict) -> None:
            nonlocal pending
            emit_until_layer()
            layer = loader(i)
            prefix = f"{job.layers_name}.{i}."
            make_room(layer, [name[len(prefix):] for name in packed])  # per-expert places for fused experts
            for name, q in packed.items():  # the loaded copy is ours: its Linears give way to the QuantLinears
                swap(layer, name[len(prefix):], q)
            t0 = time.perf_counter()
            for key, t in layer.state_dict().items():
                writer.add(prefix + key, t)
                pending = next(order, None)
            job.stats.write_s += time.perf_counter() - t0
            release(i, packed)

        try:
            _run(job, loader, on_layer)
            _moe_meta(job)
            emit_until_layer()
            writer.finish()
        finally:
            writer.close()

    has_head = any(n.startswith("lm_head.") and n.endswith(".qweight") for n, _ in plan)
    float_dtypes = {t.dtype for _, t in plan if t.is_floating_point()}
    if job.world.rank == 0:
        result = write_checkpoint(out, config, job.qcfg, has_head, float_dtypes, generation, tokenizer, write,
                                  overwrite)
    else:  # the same layers and collectives; nothing written
        _run(job, loader, release)
        result = Path(out_dir)
    job.stats.peak_memory_mb = max(job.stats.peak_memory_mb, _peak_memory_mb(job.device))
    job.stats.load_s += loader.load_s
    quantize_folder.last_stats = job.stats
    _say(opts["log"], job.stats.summary() + f" (wall {time.perf_counter() - job.t_start:.1f} s; reading layers "
                                            f"{loader.load_s:.1f} s)")
    return result


__all__ = ["ShardReader", "quantize_folder", "unstreamable"]
