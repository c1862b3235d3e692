"""``quantize_model``: sequential, layer-by-layer GPTQ / GPTAQ / RTN of a Hugging Face causal LM.

Layer i's inputs come from the already-quantized layers < i: the first layer's inputs are captured once
(the embedding output and the keyword arguments the model passes its layers), then each finished layer
maps them to the next layer's inputs. Inside a layer the linear modules are grouped by shared input
(q/k/v, gate/up) and quantized in true-sequential order (o_proj sees quantized q/k/v, down_proj sees
quantized gate/up): each group's Hessian is accumulated once from a forward pass that stops at the group.
GPTAQ carries the full-precision stream alongside and feeds the cross term ``ΔXᵀX`` (``ΔX = X_fp − X``).

Calibration sequences of one length run as one unpadded batch (``Calibration.by_length``), so padding
never enters a Hessian. With ``resume_dir`` each finished layer is saved atomically (its quantized
tensors and the next layer's inputs); a rerun with the same arguments continues there with bit-identical
results, and one with other arguments refuses to.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .nn import QuantLinear
from .ops.gptq import GPTQResult, gptq_quantize
from .ops.gptq.rtn import rtn_quantize
from .ops.hessian.accumulator import HessianAccumulator

METHODS = ("gptq", "gptaq", "rtn")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


@dataclass
class QuantizeStats:
    """Where the time went and what each module got (``quantize_model`` returns it on ``model.quantize_stats``)."""

    forward_s: float = 0.0
    hessian_s: float = 0.0
    solve_s: float = 0.0
    pack_s: float = 0.0
    peak_memory_mb: float = 0.0
    modules: dict = field(default_factory=dict)  # name -> {loss, damp, bits, group_size, seconds}

    def summary(self) -> str:
        total = self.forward_s + self.hessian_s + self.solve_s + self.pack_s
        return (f"quantize_model: {total:.1f} s = forward {self.forward_s:.1f} s + Hessian {self.hessian_s:.1f} s + "
                f"solve {self.solve_s:.1f} s + packing {self.pack_s:.1f} s; peak memory {self.peak_memory_mb:.0f} MB; "
                f"{len(self.modules)} modules")


@dataclass
class _Batch:
    hidden: torch.Tensor  # [n, L, d]: n sequences of one length L
    kwargs: dict  # what the model passes its decoder layers for this batch (masks, rotary embeddings, ...)


# --------------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the ModuleList with ``config.num_hidden_layers`` entries
    (``model.layers`` in Llama, Qwen2/3, Mistral and Gemma families)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return name, module
    arch = type(model).__name__
    raise ValueError(f"unsupported architecture {arch}: no ModuleList of {n} decoder layers found")


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _lengths_groups(calib) -> list[torch.Tensor]:
    """Calibration → list of LongTensor [n, L] (sequences of one length per tensor)."""
    if hasattr(calib, "by_length"):
        return [t for _, t in sorted(calib.by_length().items())]
    if isinstance(calib, torch.Tensor) and calib.dim() == 2:
        return [calib]
    if isinstance(calib, (list, tuple)) and all(isinstance(s, torch.Tensor) and s.dim() == 1 for s in calib):
        by_len: dict[int, list[torch.Tensor]] = {}
        for s in calib:
            by_len.setdefault(s.numel(), []).append(s)
        return [torch.stack(v) for _, v in sorted(by_len.items())]
    raise TypeError("calib must be a Calibration, a LongTensor [n, L] or a list of 1-D LongTensors")


def _micro_batches(groups: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    out = []
    for ids in groups:
        per = max(1, max_tokens // ids.shape[1])
        out += list(ids.split(per))
    return out


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _capture_first_inputs(model, layers, id_batches, device) -> list[_Batch]:
    """Run the model up to its first decoder layer for every batch; keep that layer's inputs on ``device``."""
    captured: list[_Batch] = []
    home = next(model.parameters()).device

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        captured.append(_Batch(hidden.detach().to(device), _to(kw, device)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in id_batches:
            try:
                model(input_ids=ids.to(home), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _group_linears(layer, linears: dict[str, nn.Linear], batch: _Batch) -> list[list[str]]:
    """Linear modules grouped by the input they share, in the order the forward pass reaches them."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: seen.append((n, args[0])))
             for name, m in linears.items()]
    try:
        with torch.no_grad():
            layer(batch.hidden, **batch.kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in seen:
        for g, xi in zip(groups, inputs, strict=True):
            if xi is x or (xi.shape == x.shape and xi.data_ptr() == x.data_ptr()):
                g.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    missing = set(linears) - {n for g in groups for n in g}
    if missing:
        raise RuntimeError(f"linear modules never called in a forward pass: {sorted(missing)}")
    return groups


# --------------------------------------------------------------------------------------------------
# resumable state
# --------------------------------------------------------------------------------------------------
def _fingerprint(model, id_batches, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for ids in id_batches:
        h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(str(getattr(model, "config", "")).encode())
    return h.hexdigest()[:16]


def _atomic_save(state_dir: str, files: dict[str, dict[str, torch.Tensor]], progress: dict) -> None:
    """Write tensors and progress.json into state_dir so that a crash leaves the previous state whole:
    tensor files first (new names), progress.json last by rename."""
    from safetensors.torch import save_file

    os.makedirs(state_dir, exist_ok=True)
    for name, tensors in files.items():
        tmp = os.path.join(state_dir, f".{name}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, os.path.join(state_dir, name))
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".progress")
    with os.fdopen(fd, "w") as f:
        json.dump(progress, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(state_dir, "progress.json"))


def _stream_tensors(q_batches, fp_batches) -> dict[str, torch.Tensor]:
    out = {f"q.{i}": b.hidden for i, b in enumerate(q_batches)}
    if fp_batches is not None:
        out.update({f"fp.{i}": b.hidden for i, b in enumerate(fp_batches)})
    return out


_SAVED_FIELDS = ("codes", "scales", "zeros", "g_idx")  # the weight follows from them exactly


def _result_tensors(results: dict[str, GPTQResult]) -> dict[str, torch.Tensor]:
    return {f"{name}.{f}": getattr(r, f) for name, r in results.items() for f in _SAVED_FIELDS}


def _results_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, GPTQResult]:
    out = {}
    for name, m in meta.items():
        codes, scales, zeros, g_idx = (tensors[f"{name}.{f}"] for f in _SAVED_FIELDS)
        g = g_idx.long()
        weight = (codes - zeros[:, g]).to(torch.float32) * scales[:, g]  # as gptq_quantize builds it: exact
        out[name] = GPTQResult(codes, scales, zeros, g_idx, weight, m["loss"], m["damp"], m["bits"],
                               m["group_size"], m["sym"], torch.arange(codes.shape[1]))
    return out


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------
def _module_settings(name: str, base: dict, overrides: dict | None) -> dict:
    s = dict(base)
    for pattern, over in (overrides or {}).items():
        if name == pattern or name.endswith("." + pattern) or pattern in name.split("."):
            s.update(over)
    return s


def quantize_model(
    model: nn.Module,
    calib,
    bits: int = 4,
    group_size: int = 128,
    *,
    method: str = "gptq",
    weighting: str = "sequence",
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    alpha: float = 0.25,
    reg: float | None = None,
    overrides: dict[str, dict] | None = None,
    checkpoint_format: str = "gptq",
    device: str | torch.device | None = None,
    max_batch_tokens: int = 16384,
    resume_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    callback: Callable[[str, torch.Tensor | None, GPTQResult], None] | None = None,
) -> nn.Module:
    """Quantize the decoder layers' linear modules of a Hugging Face causal LM in place; returns the model
    with ``QuantLinear`` modules, ``model.config.quantization_config`` set and ``model.quantize_stats``.

    ``calib``: a ``Calibration`` (``maca_kernels.calibration``), a LongTensor [n, L] or a list of 1-D token
    tensors. ``method`` "gptq" | "gptaq" | "rtn" (RTN needs no calibration: pass ``calib=None``).
    ``weighting`` "sequence" (MaCa: each sequence one sample) or "token" (classic). ``overrides`` maps a
    module name (or its last part, e.g. "down_proj") to other ``bits``/``group_size``. ``device``: where
    each layer runs while it is quantized (the model may stay on the CPU). ``resume_dir``: a folder for
    the per-layer state; a rerun with the same arguments resumes after the last finished layer.
    ``callback(name, H, result)`` runs after each module's solve (e.g. to keep Hessians for analysis;
    ``H`` is the mean Hessian ``2/N·Σ`` the solve used, None for RTN). lm_head and the embeddings stay
    unquantized.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weighting not in ("sequence", "token"):
        raise ValueError(f"weighting must be 'sequence' or 'token', got {weighting!r}")
    layers_name, layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    base = dict(bits=bits, group_size=group_size)
    solve_kw = dict(sym=sym, act_order=act_order, static_groups=static_groups, damp=damp, block_size=block_size,
                    mse=mse, reg=reg)
    stats = QuantizeStats()
    t_start = time.perf_counter()
    results: dict[str, GPTQResult] = {}
    model.eval()

    id_batches = [] if method == "rtn" else _micro_batches(_lengths_groups(calib), max_batch_tokens)
    if method != "rtn" and not id_batches:
        raise ValueError("calib holds no sequences")
    settings = dict(method=method, weighting=weighting, base=base, overrides=overrides, alpha=alpha, **solve_kw)
    fingerprint = _fingerprint(model, id_batches, settings)
    done_layers, module_meta = 0, {}
    if resume_dir is not None and os.path.exists(os.path.join(resume_dir, "progress.json")):
        with open(os.path.join(resume_dir, "progress.json")) as f:
            saved = json.load(f)
        if saved["fingerprint"] != fingerprint:
            diff = {k: (saved["settings"].get(k), v) for k, v in json.loads(json.dumps(settings, default=str)).items()
                    if saved["settings"].get(k) != v}
            raise ValueError(f"resume_dir {resume_dir} holds a run with other arguments "
                             f"({diff or 'same settings; other calibration data or model'}): refusing to resume; "
                             "use another folder or delete it")
        done_layers, module_meta = saved["done_layers"], saved["modules"]

    with torch.no_grad():
        q_batches = fp_batches = None
        if method != "rtn":
            if done_layers:
                from safetensors.torch import load_file

                streams = load_file(os.path.join(resume_dir, "streams.safetensors"), device=str(device))
                kw = _capture_first_inputs(model, layers, id_batches, device)
                q_batches = [_Batch(streams[f"q.{i}"], b.kwargs) for i, b in enumerate(kw)]
                if method == "gptaq":
                    fp_batches = [_Batch(streams[f"fp.{i}"], b.kwargs) for i, b in enumerate(kw)]
            else:
                t0 = time.perf_counter()
                q_batches = _capture_first_inputs(model, layers, id_batches, device)
                if method == "gptaq":
                    fp_batches = list(q_batches)  # the streams part after layer 0 (layers make new tensors)
                stats.forward_s += time.perf_counter() - t0
        if done_layers:
            from safetensors.torch import load_file

            for i in range(done_layers):
                t = load_file(os.path.join(resume_dir, f"layer_{i:04d}.safetensors"))
                prefix = f"{layers_name}.{i}."
                meta = {k: v for k, v in module_meta.items() if k.startswith(prefix)}
                for name, r in _results_from_tensors(t, meta).items():
                    results[name] = r
                    model.get_submodule(name).weight.data.copy_(r.weight.to(model.get_submodule(name).weight.dtype))
            stats.modules.update(module_meta)
            _say(log, f"resuming after layer {done_layers - 1} of {len(layers)} ({resume_dir})")

        bar = _progress(range(done_layers, len(layers)), progress, len(layers), done_layers)
        group_cache: dict[tuple, list[list[str]]] = {}
        for i in bar:
            layer = layers[i].to(device)
            fp_layer = None
            if method == "gptaq":
                fp_layer = copy.deepcopy(layer)
            linears = _linears(layer)
            prefix = f"{layers_name}.{i}."
            layer_results: dict[str, GPTQResult] = {}
            if method == "rtn":
                groups = [[n] for n in linears]
            else:  # decoder layers repeat one structure: find the groups once per set of module names
                shape_key = tuple(linears)
                if shape_key not in group_cache:
                    group_cache[shape_key] = _group_linears(layer, linears, q_batches[0])
                groups = group_cache[shape_key]
            for group in groups:
                H = dxxt = None
                if method != "rtn":
                    H, dxxt = _group_hessian(layer, fp_layer, linears[group[0]],
                                             _linears(fp_layer)[group[0]] if fp_layer is not None else None,
                                             q_batches, fp_batches, weighting, stats, device)
                for name in group:
                    full = prefix + name
                    s = _module_settings(full, base, overrides)
                    t0 = time.perf_counter()
                    W = linears[name].weight.data
                    if method == "rtn":
                        r = rtn_quantize(W, s["bits"], s["group_size"], sym, mse=mse)
                    else:
                        r = gptq_quantize(W, H, s["bits"], s["group_size"], dxxt=dxxt, alpha=alpha, name=full,
                                          **solve_kw)
                    dt = time.perf_counter() - t0
                    stats.solve_s += dt
                    W.copy_(r.weight.to(W.dtype))  # later groups and layers see the quantized weights
                    layer_results[full] = _cpu_result(r)
                    stats.modules[full] = dict(loss=r.loss, damp=r.damp, bits=s["bits"], group_size=s["group_size"],
                                               sym=sym, seconds=round(dt, 4))
                    if callback is not None:
                        callback(full, H, r)
                    _say(log, f"{full}: {s['bits']}-bit g{s['group_size']}, loss {r.loss:.4g}, damp {r.damp:.3g}, "
                              f"{dt:.2f} s")
            if method != "rtn":
                t0 = time.perf_counter()
                q_batches = [_Batch(_first(layer(b.hidden, **b.kwargs)), b.kwargs) for b in q_batches]
                if fp_layer is not None:
                    fp_batches = [_Batch(_first(fp_layer(b.hidden, **b.kwargs)), b.kwargs) for b in fp_batches]
                stats.forward_s += time.perf_counter() - t0
            layers[i] = layer.to(home)
            results.update(layer_results)
            if resume_dir is not None:
                progress_state = dict(fingerprint=fingerprint, settings=json.loads(json.dumps(settings, default=str)),
                                      done_layers=i + 1, modules=stats.modules)
                files = {f"layer_{i:04d}.safetensors": _result_tensors(layer_results)}
                if method != "rtn":
                    files["streams.safetensors"] = _stream_tensors(q_batches, fp_batches)
                _atomic_save(resume_dir, files, progress_state)

    t0 = time.perf_counter()
    for name, r in results.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = None if old.bias is None else old.bias.detach().to(torch.float16)
        setattr(parent, child, QuantLinear.from_gptq(r, bias=bias, checkpoint_format=checkpoint_format).to(home))
    stats.pack_s += time.perf_counter() - t0
    stats.peak_memory_mb = _peak_memory_mb(device)
    model.config.quantization_config = _quant_config(bits, group_size, sym, act_order, static_groups, checkpoint_format,
                                                     method, weighting, calib, overrides, damp, mse)
    model.quantize_stats = stats
    _say(log, stats.summary() + f" (wall {time.perf_counter() - t_start:.1f} s)")
    return model


def _group_hessian(layer, fp_layer, module, fp_module, q_batches, fp_batches, weighting, stats, device):
    """Hessian (and GPTAQ cross term) of the input shared by one group, over every calibration batch."""
    d = module.in_features
    acc = HessianAccumulator(d, weighting=weighting, cross_term=fp_layer is not None, device=device)
    for bi, b in enumerate(q_batches):
        x = _input_of(layer, module, b, stats)
        x_fp = _input_of(fp_layer, fp_module, fp_batches[bi], stats) if fp_layer is not None else None
        t0 = time.perf_counter()
        n, L = x.shape[0], x.shape[1]
        acc.add(x, [L] * n, x_fp=x_fp)  # 16-bit activations go to the tensor cores as they are
        stats.hessian_s += time.perf_counter() - t0
    return acc.finalize(), (acc.finalize_cross() if fp_layer is not None else None)


def _input_of(layer, module, batch: _Batch, stats) -> torch.Tensor:
    """The input ``module`` sees when ``layer`` runs on ``batch`` (the pass stops there)."""
    seen = []

    def grab(mod, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(grab)
    t0 = time.perf_counter()
    try:
        layer(batch.hidden, **batch.kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    stats.forward_s += time.perf_counter() - t0
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not reached in its layer's forward pass")
    return seen[0]


def _cpu_result(r: GPTQResult) -> GPTQResult:
    fields = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in asdict(r).items()}
    return GPTQResult(**fields)


def _quant_config(bits, group_size, sym, act_order, static_groups, checkpoint_format, method, weighting, calib,
                  overrides, damp, mse) -> dict:
    from .checkpoint import quantization_config

    meta = {"method": method, "weighting": weighting,
            "calibration": calib.describe() if hasattr(calib, "describe") else None}
    if overrides:
        meta["overrides"] = overrides
    return quantization_config(bits, group_size, sym, act_order, checkpoint_format, meta, static_groups=static_groups,
                               damp_percent=damp, mse=mse)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _say(log, msg: str) -> None:
    if log is not None:
        log(msg)


def _progress(it, enabled: bool, total: int, initial: int):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, initial=initial, desc="layers", unit="layer")


__all__ = ["METHODS", "QuantizeStats", "decoder_layers", "quantize_model"]
