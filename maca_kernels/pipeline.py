"""``quantize_model``: sequential, layer-by-layer GPTQ / GPTAQ / RTN of a Hugging Face causal LM.

Layer i's inputs come from the already-quantized layers < i: the first layer's inputs are captured once
(the embedding output and the keyword arguments the model passes its layers), then each finished layer
maps them to the next layer's inputs. Inside a layer the linear modules are grouped by shared input
(q/k/v, gate/up) and quantized in true-sequential order (o_proj sees quantized q/k/v, down_proj sees
quantized gate/up): each group's Hessian is accumulated once from a forward pass that stops at the group.
GPTAQ carries the full-precision stream alongside and feeds the cross term ``ΔXᵀX`` (``ΔX = X_fp − X``).

Calibration sequences of one length run as one unpadded batch (``Calibration.by_length``), so padding
never enters a Hessian. The caller's model is only read until the end: each layer is quantized in a working
copy and the QuantLinear modules go in together, so an exception leaves the model as it was. With
``resume_dir`` each finished layer is committed (its quantized tensors and the next layer's inputs, see
``resume.py``); a rerun with the same arguments and weights continues there with bit-identical results, and
one with other arguments or weights refuses to.
"""

from __future__ import annotations

import copy
import hashlib
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .formats.gptq import check_bits, check_checkpoint_format, check_group_size
from .layer_policy import check_layers, matches, quantized_linears
from .nn import QuantLinear
from .ops.gptq import GPTQResult, gptq_quantize
from .ops.gptq.rtn import rtn_quantize
from .ops.hessian.accumulator import HessianAccumulator
from .resume import ResumeDir, module_hash, tensors_hash

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
    load_s: float = 0.0  # reading layers from disk (quantize_folder)
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


def _linears(layer: nn.Module, keep_float: Sequence[str] = (), prefix: str = "") -> dict[str, nn.Linear]:
    """The linear modules quantized (layer_policy.py: not routers, not what keep_float names)."""
    return quantized_linears(layer, keep_float, prefix)


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


def _capture_first_inputs(model, id_batches, device) -> list[_Batch]:
    """Run the model up to its first decoder layer for every batch (the model's own module, whose weights may
    be on the meta device); keep that layer's inputs on ``device``."""
    first_layer = decoder_layers(model)[1][0]
    captured: list[_Batch] = []
    home = next(p.device for p in model.parameters() if not p.is_meta)

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        captured.append(_Batch(hidden.detach().to(device), _to(kw, device)))
        raise _Stop

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
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
# resumable state (the files and their commit point: resume.py)
# --------------------------------------------------------------------------------------------------
def _fingerprint(model, layers_name: str, id_batches, settings: dict, read=None) -> str:
    """Settings, calibration tokens, config and every weight outside the decoder layers (each finished layer's
    weights are checked on their own against the manifest; ``read(name)`` gives those a streamed model has not
    read yet)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for ids in id_batches:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.to(torch.int64).contiguous().numpy())
    h.update(str(getattr(model, "config", "")).encode())
    outside = {k: (lambda k=k: read(k)) if v.is_meta and read is not None else v
               for k, v in model.state_dict().items() if not k.startswith(layers_name + ".")}
    h.update(tensors_hash(outside).encode())
    return h.hexdigest()[:16]


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
        if matches(name, [pattern]):
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
    keep_float: Sequence[str] = (),
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
    module name (or its last part, e.g. "down_proj") to other ``bits``/``group_size``. ``keep_float`` names
    parameters or modules to leave in float (patterns as ``overrides``); every other floating matrix of a
    decoder layer must be a quantized ``nn.Linear`` or a router, else ``UncoveredParameterError`` is raised
    before any work (``layer_policy.py``: fused MoE experts are not quantized yet). ``device``: where
    each layer runs while it is quantized (the model may stay on the CPU). ``resume_dir``: a folder for
    the per-layer state (``resume.py``); a rerun with the same arguments and weights resumes after the last
    committed layer, bit-identical to an uninterrupted run; other arguments or weights, or a damaged folder,
    are refused (``ResumeError``). An exception leaves ``model`` as it was.
    ``callback(name, H, result)`` runs after each module's solve (e.g. to keep Hessians for analysis;
    ``H`` is the mean Hessian ``2/N·Σ`` the solve used, None for RTN). lm_head and the embeddings stay
    unquantized.
    """
    opts = dict(method=method, weighting=weighting, sym=sym, act_order=act_order, static_groups=static_groups,
                damp=damp, block_size=block_size, mse=mse, alpha=alpha, reg=reg, overrides=overrides,
                keep_float=keep_float, checkpoint_format=checkpoint_format, device=device,
                max_batch_tokens=max_batch_tokens, resume_dir=resume_dir, progress=progress, log=log,
                callback=callback)
    # The caller's model is only read until every layer is done: each layer is quantized in a working copy, and
    # the QuantLinear modules go in at the end. An exception or Ctrl-C leaves the model as it was.
    results: dict[str, QuantLinear] = {}
    was_training = model.training
    try:
        job = _prepare(model, calib, bits, group_size, opts)
        _run(job, None, lambda i, packed: results.update(packed))
        t0 = time.perf_counter()
        _install(model, results, job.home, job.qcfg)
        job.stats.pack_s += time.perf_counter() - t0
    except BaseException:
        model.train(was_training)
        raise
    job.stats.peak_memory_mb = _peak_memory_mb(job.device)
    model.quantize_stats = job.stats
    _say(log, job.stats.summary() + f" (wall {time.perf_counter() - job.t_start:.1f} s)")
    return model


@dataclass
class _Job:
    """One run's checked settings and state (quantize_model and the streamed pipeline share it)."""

    model: nn.Module
    layers_name: str
    layers: nn.ModuleList  # structure only for a streamed model (meta tensors): layers come from load_layer
    home: torch.device
    device: torch.device
    opts: dict
    base: dict
    solve_kw: dict
    id_batches: list
    qcfg: dict
    stats: QuantizeStats
    t_start: float
    state: ResumeDir | None = None
    read: Callable | None = None  # a streamed model's tensors outside the layers that are read only when needed


def _prepare(model: nn.Module, calib, bits, group_size, opts: dict) -> _Job:
    """Every argument checked before any forward pass (a bad setting fails at once, not at the first solve or
    after the last); the model set to eval."""
    method, weighting, keep_float = opts["method"], opts["weighting"], opts["keep_float"]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weighting not in ("sequence", "token"):
        raise ValueError(f"weighting must be 'sequence' or 'token', got {weighting!r}")
    bits = check_bits(bits)
    check_checkpoint_format(opts["checkpoint_format"])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"group_size must be -1 (one group per row) or a positive int, got {group_size!r}")
    _refuse_quantized(model)
    if isinstance(keep_float, str) or not all(isinstance(k, str) for k in keep_float):
        raise ValueError(f"keep_float must be a sequence of name patterns (str), got {keep_float!r}")
    keep_float = opts["keep_float"] = tuple(keep_float)
    layers_name, layers = decoder_layers(model)
    check_layers(layers_name, layers, keep_float)  # no floating matrix left in float silently (layer_policy.py)
    for i, layer in enumerate(layers):  # every module's group size divides its in_features
        prefix = f"{layers_name}.{i}."
        for name, lin in quantized_linears(layer, keep_float, prefix).items():
            s = _module_settings(prefix + name, dict(bits=bits, group_size=group_size), opts["overrides"])
            check_group_size(s["group_size"], lin.in_features, f" ({prefix + name})")
    home = next(p.device for p in model.parameters() if not p.is_meta)
    device = torch.device(opts["device"]) if opts["device"] is not None else home
    solve_kw = {k: opts[k] for k in ("sym", "act_order", "static_groups", "damp", "block_size", "mse", "reg")}
    id_batches = [] if method == "rtn" else _micro_batches(_lengths_groups(calib), opts["max_batch_tokens"])
    if method != "rtn" and not id_batches:
        raise ValueError("calib holds no sequences")
    qcfg = _quant_config(bits, group_size, opts["sym"], opts["act_order"], opts["static_groups"],
                         opts["checkpoint_format"], method, weighting, calib, opts["overrides"], keep_float,
                         opts["damp"], opts["mse"])
    model.eval()
    return _Job(model, layers_name, layers, home, device, opts, dict(bits=bits, group_size=group_size), solve_kw,
                id_batches, qcfg, QuantizeStats(), time.perf_counter())


def _run(job: _Job, load_layer, on_layer) -> None:
    """The layers in order (``load_layer(i)``: layer i with its weights; None: the model's own), each finished one
    handed to ``on_layer(i, packed)``; resumable (``opts["resume_dir"]``)."""
    o = job.opts
    load_layer = load_layer or job.layers.__getitem__
    # what decides the bits: the batching sets the Hessian's summation order, the device the arithmetic
    settings = dict(method=o["method"], weighting=o["weighting"], base=job.base, overrides=o["overrides"],
                    alpha=o["alpha"], **job.solve_kw, max_batch_tokens=o["max_batch_tokens"],
                    device=job.device.type, keep_float=sorted(o["keep_float"]))
    manifest = layer_hashes = None
    if o["resume_dir"] is not None:
        layer_hashes = _LayerHashes(len(job.layers), load_layer)
        job.state = ResumeDir(o["resume_dir"], _fingerprint(job.model, job.layers_name, job.id_batches, settings,
                                                            job.read), settings)
        manifest = job.state.read_manifest(layer_hashes)
    with torch.no_grad():
        _quantize_layers(job.model, job.layers_name, len(job.layers), load_layer, job.id_batches, o["method"],
                         o["weighting"], job.base, o["overrides"], o["keep_float"], job.solve_kw, o["alpha"],
                         o["checkpoint_format"], job.device, job.state, manifest, layer_hashes, job.stats,
                         o["progress"], o["log"], o["callback"], on_layer)


class _LayerHashes:
    """Each layer's weight hash (resume.py), computed when first asked for (a streamed model loads one layer at
    a time): the resume state asks for the finished layers' on resuming, and for each layer as it commits."""

    def __init__(self, n: int, load_layer):
        self.n, self.load_layer, self.known = n, load_layer, {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i not in self.known:
            self.known[i] = module_hash(self.load_layer(i))
        return self.known[i]


def _refuse_quantized(model: nn.Module) -> None:
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(f"the model is already quantized ({len(quantized)} QuantLinear modules, e.g. "
                         f"{quantized[0]!r}): quantize_model takes a model with float weights")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ValueError("model.config.quantization_config is set: the model is already quantized; quantize_model "
                         "takes a model with float weights")


def _resumed_layer(state: ResumeDir, manifest: dict, layers_name: str, i: int, linears: dict) -> dict:
    """Layer i's results from the resume folder, checked against the layer's modules."""
    fname = f"layer_{i:04d}.safetensors"
    prefix = f"{layers_name}.{i}."
    meta = {k: v for k, v in manifest["modules"].items() if k.startswith(prefix)}
    if sorted(meta) != sorted(prefix + n for n in linears):
        raise state._error("progress.json", f"names modules {sorted(meta)} for layer {i}, the model has "
                                            f"{sorted(prefix + n for n in linears)}")
    tensors = state.load(fname)
    want = {}
    for name, m in meta.items():
        N, K = linears[name[len(prefix):]].weight.shape
        try:
            if any(k not in m for k in ("loss", "damp", "bits", "group_size", "sym")):
                raise ValueError("missing keys")
            check_group_size(m["group_size"], K)
        except ValueError:
            raise state._error("progress.json", f"has incomplete or invalid settings for {name}") from None
        G = 1 if m["group_size"] == -1 else K // m["group_size"]
        want.update({f"{name}.codes": (N, K), f"{name}.scales": (N, G), f"{name}.zeros": (N, G),
                     f"{name}.g_idx": (K,)})
    state.check(fname, tensors, want)
    return _results_from_tensors(tensors, meta)


def _quantize_layers(model, layers_name, n_layers, load_layer, id_batches, method, weighting, base, overrides,
                     keep_float, solve_kw, alpha, checkpoint_format, device, state, manifest, layer_hashes, stats,
                     progress, log, callback, on_layer) -> None:
    """Every decoder layer in order: ``load_layer(i)`` gives layer i (read only), ``on_layer(i, packed)`` takes
    its QuantLinear modules by name (packed on the CPU: a finished layer keeps nothing else)."""
    done_layers = manifest["done_layers"] if manifest else 0
    for i in range(done_layers):
        layer = load_layer(i)
        linears = _linears(layer, keep_float, f"{layers_name}.{i}.")
        resumed = _resumed_layer(state, manifest, layers_name, i, linears)
        on_layer(i, {name: _packed(r, linears[name[len(f"{layers_name}.{i}."):]], checkpoint_format)
                     for name, r in resumed.items()})  # (resumed results are on the CPU)
        del layer, resumed
    if done_layers:
        stats.modules.update(manifest["modules"])
        _say(log, f"resuming after layer {done_layers - 1} of {n_layers} ({state.path})")

    q_batches = fp_batches = None
    if method != "rtn" and done_layers < n_layers:
        t0 = time.perf_counter()
        first = _capture_first_inputs(model, id_batches, device)
        stats.forward_s += time.perf_counter() - t0
        if done_layers:  # the inputs of the next layer, with the keyword arguments captured afresh
            fname = f"streams_{done_layers - 1:04d}.safetensors"
            streams = state.load(fname, device)
            kinds = ("q", "fp") if method == "gptaq" else ("q",)
            state.check(fname, streams, {f"{k}.{j}": b.hidden.shape for k in kinds for j, b in enumerate(first)})
            q_batches = [_Batch(streams[f"q.{j}"], b.kwargs) for j, b in enumerate(first)]
            if method == "gptaq":
                fp_batches = [_Batch(streams[f"fp.{j}"], b.kwargs) for j, b in enumerate(first)]
        else:
            q_batches = first
            if method == "gptaq":
                fp_batches = list(q_batches)  # the streams part after layer 0 (layers make new tensors)

    bar = _progress(range(done_layers, n_layers), progress, n_layers, done_layers)
    group_cache: dict[tuple, list[list[str]]] = {}
    for i in bar:
        layer_results, packed, q_batches, fp_batches = _quantize_layer(
            load_layer(i), f"{layers_name}.{i}.", q_batches, fp_batches, group_cache, method, weighting, base,
            overrides, keep_float, solve_kw, alpha, checkpoint_format, device, stats, log, callback)
        if state is not None:
            streams = None if method == "rtn" else _stream_tensors(q_batches, fp_batches)
            state.commit(i, _result_tensors(layer_results), streams, layer_hashes, stats.modules)
        del layer_results
        on_layer(i, packed)


def _quantize_layer(source: nn.Module, prefix: str, q_batches, fp_batches, group_cache, method, weighting, base,
                    overrides, keep_float, solve_kw, alpha, checkpoint_format, device, stats, log, callback):
    """One decoder layer, quantized in a working copy (the caller's layer stays as it is; the copy is freed on
    return). Returns its results (CPU), their QuantLinear modules and the next layer's inputs."""
    layer = copy.deepcopy(source).to(device)
    fp_layer = copy.deepcopy(layer) if method == "gptaq" else None
    linears = _linears(layer, keep_float, prefix)
    layer_results: dict[str, GPTQResult] = {}
    packed: dict[str, QuantLinear] = {}
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
                                     _linears(fp_layer, keep_float, prefix)[group[0]] if fp_layer is not None else None,
                                     q_batches, fp_batches, weighting, stats, device)
        for name in group:
            full = prefix + name
            s = _module_settings(full, base, overrides)
            t0 = time.perf_counter()
            W = linears[name].weight.data
            if method == "rtn":
                r = rtn_quantize(W, s["bits"], s["group_size"], solve_kw["sym"], mse=solve_kw["mse"], name=full)
            else:
                r = gptq_quantize(W, H, s["bits"], s["group_size"], dxxt=dxxt, alpha=alpha, name=full, **solve_kw)
            dt = time.perf_counter() - t0
            stats.solve_s += dt
            W.copy_(r.weight.to(W.dtype))  # later groups (in this copy) and layers see the quantized weights
            layer_results[full] = _cpu_result(r)
            t0 = time.perf_counter()
            packed[full] = _packed(layer_results[full], linears[name], checkpoint_format)
            stats.pack_s += time.perf_counter() - t0
            stats.modules[full] = dict(loss=r.loss, damp=r.damp, bits=s["bits"], group_size=s["group_size"],
                                       sym=solve_kw["sym"], seconds=round(dt, 4))
            if callback is not None:
                callback(full, H, r)
            _say(log, f"{full}: {s['bits']}-bit g{s['group_size']}, loss {r.loss:.4g}, damp {r.damp:.3g}, {dt:.2f} s")
    if method != "rtn":
        t0 = time.perf_counter()
        q_batches = [_Batch(_first(layer(b.hidden, **b.kwargs)), b.kwargs) for b in q_batches]
        if fp_layer is not None:
            fp_batches = [_Batch(_first(fp_layer(b.hidden, **b.kwargs)), b.kwargs) for b in fp_batches]
        stats.forward_s += time.perf_counter() - t0
    return layer_results, packed, q_batches, fp_batches


def _packed(r: GPTQResult, linear: nn.Linear, checkpoint_format: str) -> QuantLinear:
    """The QuantLinear of one solved module on the CPU (its bias in fp16): what a finished layer keeps."""
    bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float16)
    return QuantLinear.from_gptq(r, bias=bias, checkpoint_format=checkpoint_format)


def _install(model: nn.Module, results: dict[str, QuantLinear], home, qcfg: dict) -> None:
    """Replace each quantized Linear by its QuantLinear and set the config; all or nothing."""
    new = {name: q.to(home) for name, q in results.items()}
    swapped: list[tuple[str, nn.Module]] = []
    had_cfg = "quantization_config" in vars(model.config)
    try:
        for name, q in new.items():
            swapped.append((name, _swap(model, name, q)))
        model.config.quantization_config = qcfg
    except BaseException:
        for name, old in reversed(swapped):
            _swap(model, name, old)
        if had_cfg:
            model.config.quantization_config = None  # _refuse_quantized saw None there
        else:
            vars(model.config).pop("quantization_config", None)
        raise


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


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
                  overrides, keep_float, damp, mse) -> dict:
    from .checkpoint import quantization_config

    meta = {"method": method, "weighting": weighting,
            "calibration": calib.describe() if hasattr(calib, "describe") else None}
    if overrides:
        meta["overrides"] = overrides
    if keep_float:
        meta["keep_float"] = list(keep_float)
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
