"""``quantize_model``: sequential, layer-by-layer GPTQ / GPTAQ / RTN of a Hugging Face causal LM, on one process or
on the ranks of a ``torchrun`` launch (the single process is the world of one: the same code path).

Layer i's inputs come from the already-quantized layers < i: the first layer's inputs are captured once (the
embedding output and the keyword arguments the model passes its layers), then each finished layer maps them to the
next layer's inputs. Inside a layer the linear modules are grouped by shared input (q/k/v, gate/up) and quantized
in true-sequential order (o_proj sees quantized q/k/v, down_proj sees quantized gate/up): each group's Hessian is
accumulated from forward passes that stop at the group. GPTAQ carries the full-precision stream alongside and
feeds the cross term ``ΔXᵀX`` (``ΔX = X_fp − X``).

The calibration set is cut into virtual shards (shards.py); each rank runs its shards, each shard's Hessian sums
are its own and the shards' sums are added in shard order in float64 (world.py), so the bits depend on the shards,
never on the number of ranks. A group's modules are solved on the ranks schedule.py assigns and the results
broadcast to all. Calibration sequences of one length in a shard run as one unpadded batch, so padding never
enters a Hessian. The caller's model is only read until the end: each layer is quantized in a working copy and the
QuantLinear modules go in together, so an exception leaves the model as it was. With ``resume_dir`` each finished
layer is committed (state.py, resume.py); a rerun with the same arguments and weights, on any number of ranks,
continues there with bit-identical results, and one with other arguments or weights refuses to.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..formats.gptq import check_bits, check_checkpoint_format, check_group_size
from ..layer_policy import check_layers, quantized_linears
from ..nn import QuantLinear
from ..ops.gptq import GPTQResult, gptq_factor, gptq_quantize_batched
from ..ops.gptq.rtn import rtn_quantize
from ..ops.hessian.accumulator import HessianAccumulator
from ..resume import ResumeDir
from . import expert_hessians as eh
from .activations import check_place, fits, free_bytes, keep, store_for, use
from .experts import ExpertList, FusedExperts, find_experts, make_room
from .model import (
    Batch,
    capture_first_inputs,
    decoder_layers,
    group_linears,
    linears,
    module_settings,
    swap,
)
from .schedule import assign_solves
from .shards import Shards, make_shards
from .stages import Replay, Stages
from .state import (
    SAVED_FIELDS,
    LayerHashes,
    fingerprint,
    rebuild,
    result_tensors,
    resumed_layer,
    resumed_streams,
    run_hash,
    stream_tensors,
    streams_file,
)
from .world import ShardSums, World

METHODS = ("gptq", "gptaq", "rtn")
MOE_CALIBRATIONS = ("routed", "all")


@dataclass
class QuantizeStats:
    """Where the time went and what each module got (``quantize_model`` returns it on ``model.quantize_stats``;
    with several ranks, each rank's own)."""

    forward_s: float = 0.0
    hessian_s: float = 0.0
    wait_s: float = 0.0  # waiting for the other ranks before a collective (their share of work took longer)
    reduce_s: float = 0.0  # the collectives themselves: shards' Hessian sums, solved modules shared
    solve_s: float = 0.0  # this rank's solves
    pack_s: float = 0.0
    ordered_entries: int = 0  # Hessian entries whose shards' values spanned too many orders for any-order float64
    load_s: float = 0.0  # reading layers from disk (quantize_folder)
    write_s: float = 0.0  # writing the checkpoint's shards (quantize_folder)
    peak_memory_mb: float = 0.0
    # the largest each part held at once, MB: "layer" (the working copies of a layer, GPTAQ's float one included),
    # "activations" (this rank's inputs of a layer, both streams), "hessian" (a group's sums, their float64 total
    # and the mean); on CUDA also "solve": the solver's measured peak above what was allocated when it started
    memory_mb: dict = field(default_factory=dict)
    world_size: int = 1
    # fused-experts module -> per expert: "tokens" routed to it, "sequences" with a routed token, "policy" applied
    experts: dict = field(default_factory=dict)
    activations_on: str = ""  # where the calibration streams waited between uses
    modules: dict = field(default_factory=dict)  # name -> {loss, damp, bits, group_size, sym, seconds}

    def held(self, part: str, tensors) -> None:
        mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        self.memory_mb[part] = round(max(self.memory_mb.get(part, 0.0), mb), 3)

    def summary(self) -> str:
        total = self.forward_s + self.hessian_s + self.wait_s + self.reduce_s + self.solve_s + self.pack_s
        ranks = (f" (rank's share of {self.world_size}; waiting {self.wait_s:.1f} s + collectives "
                 f"{self.reduce_s:.1f} s)" if self.world_size > 1 else "")
        return (f"quantize_model: {total:.1f} s{ranks} = forward {self.forward_s:.1f} s + Hessian "
                f"{self.hessian_s:.1f} s + solve {self.solve_s:.1f} s + packing {self.pack_s:.1f} s; peak memory "
                f"{self.peak_memory_mb:.0f} MB; {len(self.modules)} modules")


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
    reg: float | str | None = "auto",
    overrides: dict[str, dict] | None = None,
    keep_float: Sequence[str] = (),
    checkpoint_format: str = "gptq",
    device: str | torch.device | None = None,
    max_batch_tokens: int = 16384,
    calib_shards: int = 8,
    moe_calibration: str = "routed",
    moe_min_tokens: int = 128,
    activations: str = "auto",
    resume_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    callback: Callable[[str, torch.Tensor | None, GPTQResult], None] | None = None,
) -> nn.Module:
    """Quantize the decoder layers' linear modules of a Hugging Face causal LM in place; returns the model
    with ``QuantLinear`` modules, ``model.config.quantization_config`` set and ``model.quantize_stats``.

    ``calib``: a ``Calibration`` (``maca_kernels.calibration``), a LongTensor [n, L] or a list of 1-D token
    tensors. ``method`` "gptq" | "gptaq" | "rtn" (RTN needs no calibration: pass ``calib=None``).
    ``weighting`` "sequence" (MaCa: each sequence one sample) or "token" (classic). ``reg``: saliency
    regularisation λ (H + λ·diag(H)), or "auto" (the default): the λ the study chose for each module's bits
    (``STUDY_REG``: 2.0 at 4 bits, 0.5 at 3, 1.0 at 2; README "Results", rows "λ chosen": the best of
    λ ∈ {0, 0.05, 0.5, 1, 2, 4, 8} on held-out Jargon text). ``reg=0`` (or None) with ``weighting="token"`` is
    the classic GPTQ.
    ``overrides`` maps a module name pattern (e.g. "down_proj", "model.layers.0") to other ``bits`` /
    ``group_size``. ``keep_float`` names parameters or modules to leave in float (patterns as ``overrides``:
    a run of whole dotted parts, so a module's name covers everything inside it); every other floating matrix of a
    decoder layer must be a quantized ``nn.Linear``, fused experts or a router, else ``UncoveredParameterError`` is
    raised before any work (``layer_policy.py``).

    Fused MoE experts (``pipeline/experts.py``) are quantized per expert (``experts.{e}.gate_proj`` / ``up_proj`` /
    ``down_proj``); expert e's Hessian comes from the tokens routed to it. With ``weighting="sequence"`` each
    sequence s with n_se > 0 tokens routed to e is one sample: ``H_e = 2/S_e · Σ_s (1/n_se) Σ_{t∈s→e} x_t x_tᵀ``
    (S_e: those sequences); with "token", ``H_e = 2/N_e · Σ_{t→e} x_t x_tᵀ`` (N_e = Σ_s n_se). Gate and up share
    H_e; down's comes from the expert's own ``act(gate)·up`` of those tokens. The router's weights do not enter
    (as in GPTQ for dense modules). ``moe_calibration="routed"``: an expert with N_e < ``moe_min_tokens`` routed
    tokens gets ``(N_e/m)·H_e + (1 − N_e/m)·H_e^all`` (m = moe_min_tokens; H^all: every token through that expert,
    weighted as the run), so an expert no token reaches is solved on H^all, never on zeros. "all": every expert
    sees every token (H^all for all). Per-expert counts and the policy applied go to ``quantize_stats.experts``
    and the checkpoint's meta. ``device``: where
    each layer runs while it is quantized (the model may stay on the CPU). ``calib_shards``: the virtual shards
    the calibration set is cut into (at most one per sequence), the unit of data parallelism: the result depends on
    it, not on the number of ranks. ``activations``: where a layer's calibration inputs wait between uses, "device"
    (where the layer runs), "host" (CPU memory, pinned; each micro-batch is sent to the GPU when used) or "auto" (the
    device while the streams take at most a quarter of its free memory); exact either way. ``resume_dir``: a folder
    for the per-layer state (``resume.py``); a rerun with
    the same arguments and weights resumes after the last committed layer, bit-identical to an uninterrupted run;
    other arguments or weights, or a damaged folder, are refused (``ResumeError``). An exception leaves ``model``
    as it was.

    Under ``torchrun`` (a default process group is initialised) every rank calls this with the same arguments and
    its own copy of the model: each runs its shards' forward passes, Hessian sums are combined in a fixed order,
    each module is solved on one rank and shared, and every rank returns the same quantized model, bit for bit
    the one a single process makes. Logging and progress come from rank 0 only.
    ``callback(name, H, result)`` runs after each module's solve, on the rank that solved it (e.g. to keep
    Hessians for analysis; ``H`` is the mean Hessian ``2/N·Σ`` the solve used, None for RTN). lm_head and the
    embeddings stay unquantized.
    """
    opts = dict(method=method, weighting=weighting, sym=sym, act_order=act_order, static_groups=static_groups,
                damp=damp, block_size=block_size, mse=mse, alpha=alpha, reg=reg, overrides=overrides,
                moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens,
                keep_float=keep_float, checkpoint_format=checkpoint_format, device=device,
                max_batch_tokens=max_batch_tokens, calib_shards=calib_shards, activations=activations,
                resume_dir=resume_dir, progress=progress, log=log, callback=callback)
    # The caller's model is only read until every layer is done: each layer is quantized in a working copy, and
    # the QuantLinear modules go in at the end. An exception or Ctrl-C leaves the model as it was.
    results: dict[str, QuantLinear] = {}
    was_training = model.training
    try:
        job = _prepare(model, calib, bits, group_size, opts)
        _run(job, None, lambda i, packed: results.update(packed))
        t0 = time.perf_counter()
        _moe_meta(job)
        _install(model, results, job.home, job.qcfg)
        job.stats.pack_s += time.perf_counter() - t0
    except BaseException:
        model.train(was_training)
        raise
    job.stats.peak_memory_mb = max(job.stats.peak_memory_mb, _peak_memory_mb(job.device))
    model.quantize_stats = job.stats
    _say(job.opts["log"], job.stats.summary() + f" (wall {time.perf_counter() - job.t_start:.1f} s)")
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
    world: World
    shards: Shards
    qcfg: dict
    stats: QuantizeStats
    t_start: float
    state: ResumeDir | None = None
    store: torch.device | None = None  # where the calibration streams wait (activations.py)
    read: Callable | None = None  # a streamed model's tensors outside the layers that are read only when needed

    @property
    def mine(self) -> list[int]:
        return self.shards.of(self.world.rank)


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
    shards = opts["calib_shards"]
    if isinstance(shards, bool) or not isinstance(shards, int) or shards <= 0:
        raise ValueError(f"calib_shards must be a positive int, got {shards!r}")
    check_place(opts["activations"])
    if opts["moe_calibration"] not in MOE_CALIBRATIONS:
        raise ValueError(f"moe_calibration must be one of {MOE_CALIBRATIONS}, got {opts['moe_calibration']!r}")
    m = opts["moe_min_tokens"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"moe_min_tokens must be an int >= 0, got {m!r}")
    check_settings(opts)
    _refuse_quantized(model)
    if isinstance(keep_float, str) or not all(isinstance(k, str) for k in keep_float):
        raise ValueError(f"keep_float must be a sequence of name patterns (str), got {keep_float!r}")
    keep_float = opts["keep_float"] = tuple(keep_float)
    layers_name, layers = decoder_layers(model)
    check_layers(layers_name, layers, keep_float)  # no floating matrix left in float silently (layer_policy.py)
    probed = set()
    for i, layer in enumerate(layers):  # every module's group size divides its in_features
        prefix = f"{layers_name}.{i}."
        mods, experts = _targets(layer, keep_float, prefix)
        for ex in experts.values():  # our reading of each experts class checked on its first module, before any work
            if type(ex.entry) not in probed and not ex.is_meta:
                ex.check()
                probed.add(type(ex.entry))
        for name, lin in mods.items():
            s = module_settings(prefix + name, dict(bits=bits, group_size=group_size), opts["overrides"])
            check_group_size(s["group_size"], lin.in_features, f" ({prefix + name})")
    home = next(p.device for p in model.parameters() if not p.is_meta)
    device = torch.device(opts["device"]) if opts["device"] is not None else home
    if device.type == "cuda" and device.index is None:  # the caller's current device, named (threads start on 0)
        device = torch.device("cuda", torch.cuda.current_device())
    solve_kw = {k: opts[k] for k in ("sym", "act_order", "static_groups", "damp", "block_size", "mse", "reg")}
    world = World()
    groups = [] if method == "rtn" else _lengths_groups(calib)
    if method != "rtn" and not any(g.numel() for g in groups):
        raise ValueError("calib holds no sequences")
    if world.rank != 0:  # one voice
        opts["log"], opts["progress"] = None, False
    qcfg = _quant_config(bits, group_size, opts["sym"], opts["act_order"], opts["static_groups"],
                         opts["checkpoint_format"], method, weighting, calib, opts["overrides"], keep_float,
                         opts["damp"], opts["mse"])
    if method != "rtn":  # the λ each bit width of the run was solved with
        widths = {bits} | {o["bits"] for o in (opts["overrides"] or {}).values() if "bits" in o}
        qcfg["meta"]["reg"] = {str(b): resolved_reg(opts["reg"], b) for b in sorted(widths)}
    if world.size > 1:
        world.same_everywhere(_arguments_digest(model, groups, bits, group_size, opts, device),
                              "arguments, calibration tokens or model structure")
    model.eval()
    return _Job(model, layers_name, layers, home, device, opts, dict(bits=bits, group_size=group_size), solve_kw,
                world, make_shards(groups, shards, opts["max_batch_tokens"], world.size), qcfg,
                QuantizeStats(world_size=world.size), time.perf_counter())


# The saliency strength λ the study (README "Results") chose on held-out in-domain text, per bit width: an optimum
# inside the grid {0, 0.05, 0.5, 1, 2, 4, 8} for every cell; the same for both calibrations at 4 bits (2) and 3 bits
# (0.5); at 2 bits MaCa's (1; fixed-length chose 2). 8 bits was not studied and takes the 4-bit value.
STUDY_REG = {8: 2.0, 4: 2.0, 3: 0.5, 2: 1.0}


def resolved_reg(reg, bits: int) -> float | None:
    return STUDY_REG[bits] if reg == "auto" else reg


def check_settings(s: dict, flag: Callable[[str], str] = str) -> None:
    """The solver's settings, the overrides and the batching, checked before any work (``flag`` names an argument:
    the CLI gives its own flags)."""
    def number(k, lo=0.0):
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise ValueError(f"{flag(k)} must be a number ≥ {lo:g}, got {v!r}")

    if isinstance(s["damp"], bool) or not isinstance(s["damp"], (int, float)) or not s["damp"] >= 0 \
            or not math.isfinite(s["damp"]):
        raise ValueError(f"{flag('damp')} must be a fraction ≥ 0 of mean(diag H), got {s['damp']!r}")
    number("alpha")
    if s["reg"] is not None and s["reg"] != "auto":
        if isinstance(s["reg"], str):
            raise ValueError(f"{flag('reg')} must be 'auto' or a number ≥ 0, got {s['reg']!r}")
        number("reg")
    for k in ("block_size", "max_batch_tokens"):
        if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] <= 0:
            raise ValueError(f"{flag(k)} must be a positive int, got {s[k]!r}")
    for k in ("mse", "static_groups"):
        if not isinstance(s[k], bool):
            raise ValueError(f"{flag(k)} must be a bool, got {s[k]!r}")
    over = s["overrides"]
    if over is None:
        return
    if not isinstance(over, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in over.items()):
        raise ValueError(f"{flag('overrides')} must map module name patterns to settings, e.g. "
                         f'{{"down_proj": {{"bits": 8}}}}, got {over!r}')
    for pattern, settings in over.items():
        unknown = set(settings) - {"bits", "group_size"}
        if unknown:
            raise ValueError(f"{flag('overrides')}[{pattern!r}]: only bits and group_size can differ per module, got "
                             f"{sorted(unknown)}")
        try:
            if "bits" in settings:
                check_bits(settings["bits"])
            g = settings.get("group_size", -1)
            if isinstance(g, bool) or not isinstance(g, int) or (g != -1 and g <= 0):
                raise ValueError(f"group_size must be -1 (one group per row) or a positive int, got {g!r}")
        except ValueError as exc:
            raise ValueError(f"{flag('overrides')}[{pattern!r}]: {exc}") from None


def _targets(layer: nn.Module, keep_float, prefix: str) -> tuple[dict, dict[str, FusedExperts | ExpertList]]:
    """What is quantized in a layer by name within it: its Linears and every expert's projections (views into the
    fused parameters, or a list's Linears), and the experts modules."""
    experts = find_experts(layer, keep_float, prefix)
    mods = dict(quantized_linears(layer, keep_float, prefix))
    for ex in experts.values():
        mods.update(ex.slices())
    return mods, experts


def _arguments_digest(model, groups, bits, group_size, opts, device) -> str:
    """What every rank must agree on before the first collective (not the weights: those are checked by the resume
    state, and hashing a big model's weights on every rank would cost minutes)."""
    skip = ("log", "progress", "callback", "device", "activations")  # per rank, or not affecting the collectives
    settings = dict(bits=bits, group_size=group_size, device=device.type,
                    **{k: v for k, v in opts.items() if k not in skip})
    return run_hash(model, groups, settings).hexdigest()


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


def _run(job: _Job, load_layer, on_layer) -> None:
    """The layers in order (``load_layer(i)``: layer i with its weights; None: the model's own), each finished one
    handed to ``on_layer(i, packed)``; resumable (``opts["resume_dir"]``)."""
    o = job.opts
    load_layer = load_layer or job.layers.__getitem__
    # what decides the bits: the shards and their batching set the Hessian's summation order, the device the
    # arithmetic, and on a CPU the threads per process (MKL's matmuls and factorizations split their sums by thread
    # count); the number of ranks does not
    cpu_threads = torch.get_num_threads() if job.device.type == "cpu" else None
    settings = dict(method=o["method"], weighting=o["weighting"], base=job.base, overrides=o["overrides"],
                    alpha=o["alpha"], **job.solve_kw, max_batch_tokens=o["max_batch_tokens"],
                    reg_by_bits={str(b): resolved_reg(o["reg"], b) for b in STUDY_REG},  # what "auto" meant
                    moe_calibration=o["moe_calibration"], moe_min_tokens=o["moe_min_tokens"],
                    calib_shards=o["calib_shards"], device=job.device.type, cpu_threads=cpu_threads,
                    keep_float=sorted(o["keep_float"]))
    manifest = layer_hashes = None
    if o["resume_dir"] is not None:
        layer_hashes = LayerHashes(len(job.layers), load_layer)
        id_batches = [ids for batches in job.shards.batches for ids in batches]
        job.state = ResumeDir(o["resume_dir"], fingerprint(job.model, job.layers_name, id_batches, settings,
                                                           job.read), settings)
        manifest = job.state.read_manifest(layer_hashes)
        job.world.barrier()  # every rank has read it before rank 0 commits again
    with torch.no_grad():
        _quantize_layers(job, load_layer, manifest, layer_hashes, on_layer)


def _refuse_quantized(model: nn.Module) -> None:
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(f"the model is already quantized ({len(quantized)} QuantLinear modules, e.g. "
                         f"{quantized[0]!r}): quantize_model takes a model with float weights")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ValueError("model.config.quantization_config is set: the model is already quantized; quantize_model "
                         "takes a model with float weights")


def _quantize_layers(job: _Job, load_layer, manifest, layer_hashes, on_layer) -> None:
    """Every decoder layer in order: ``load_layer(i)`` gives layer i (read only), ``on_layer(i, packed)`` takes
    its QuantLinear modules by name (packed on the CPU: a finished layer keeps nothing else)."""
    o, state, stats, n_layers = job.opts, job.state, job.stats, len(job.layers)
    done_layers = manifest["done_layers"] if manifest else 0
    for i in range(done_layers):
        layer = load_layer(i)
        prefix = f"{job.layers_name}.{i}."
        mods = _targets(layer, o["keep_float"], prefix)[0]
        resumed = resumed_layer(state, manifest, job.layers_name, i, mods)
        on_layer(i, {name: _packed(r, mods[name[len(prefix):]], o["checkpoint_format"])
                     for name, r in resumed.items()})
        del layer, resumed
    if done_layers:
        stats.modules.update(manifest["modules"])
        stats.experts.update(manifest["experts"])
        _say(o["log"], f"resuming after layer {done_layers - 1} of {n_layers} ({state.path})")

    q: dict[int, list[Batch]] = {}  # shard -> its batches' inputs of the current layer (this rank's shards)
    fp: dict[int, list[Batch]] | None = None  # GPTAQ's full-precision stream
    gptaq = o["method"] == "gptaq"
    if o["method"] != "rtn" and done_layers < n_layers:
        job.store = store_for(o["activations"], job.device, _stream_bytes(job, gptaq))
        stats.activations_on = str(job.store)
        t0 = time.perf_counter()
        captured = {s: [Batch(keep(b.hidden, job.store), b.kwargs)
                        for b in capture_first_inputs(job.model, job.shards.batches[s], job.device)]
                    for s in job.mine}
        stats.forward_s += time.perf_counter() - t0
        if done_layers:  # the inputs of the next layer, with the keyword arguments captured afresh
            fp = {} if gptaq else None
            for s, firsts in captured.items():
                q[s], fps = resumed_streams(state, done_layers - 1, s, firsts, gptaq, job.store)
                if gptaq:
                    fp[s] = fps
        else:
            q = captured
            fp = {s: list(b) for s, b in q.items()} if gptaq else None  # the streams part after layer 0

    bar = _progress(range(done_layers, n_layers), o["progress"], n_layers, done_layers)
    group_cache: dict[tuple, list[list[str]]] = {}
    for i in bar:
        layer_results, packed, q, fp = _quantize_layer(job, load_layer(i), f"{job.layers_name}.{i}.", q, fp,
                                                       group_cache)
        if state is not None:
            streams = {} if o["method"] == "rtn" else {
                streams_file(i, s): stream_tensors(q[s], fp[s] if gptaq else None) for s in job.mine}
            state.commit(i, result_tensors(layer_results), streams, layer_hashes, stats.modules, job.world,
                         stats.experts)
        del layer_results
        on_layer(i, packed)


def _quantize_layer(job: _Job, source: nn.Module, prefix: str, q, fp, group_cache):
    """One decoder layer, quantized in a working copy (the caller's layer stays as it is; the copy is freed on
    return). Returns its results (CPU), their QuantLinear modules and the next layer's inputs."""
    o, stats, world = job.opts, job.stats, job.world
    layer = copy.deepcopy(source).to(job.device)
    fp_layer = copy.deepcopy(layer) if o["method"] == "gptaq" else None
    mods, experts = _targets(layer, o["keep_float"], prefix)
    for ex in experts.values():
        ex.check()
    stats.held("layer", [*layer.state_dict().values(), *(fp_layer.state_dict().values() if fp_layer else ())])
    stats.held("activations", [b.hidden for bs in [*q.values(), *(fp or {}).values()] for b in bs])
    layer_results: dict[str, dict] = {}  # name -> the tensors a resume commit writes (only with resume_dir)
    packed: dict[str, QuantLinear] = {}
    if o["method"] == "rtn":
        groups = [list(mods)]  # no Hessian: every module at once
    else:  # decoder layers repeat one structure: find the groups once per set of module names (rank 0 holds a shard)
        shape_key = (tuple(mods), tuple(experts))
        if shape_key not in group_cache:
            in_experts = {n for ex in experts.values() for n in ex.slices()}
            lin = {n: m for n, m in mods.items() if n not in in_experts}
            found = (group_linears(layer, lin, use(q[job.mine[0]][0], job.device),
                                   {n: ex.entry for n, ex in experts.items()}) if world.rank == 0 else None)
            group_cache[shape_key] = world.broadcast_object(found)
        groups = group_cache[shape_key]
    if o["method"] == "rtn":
        for group in groups:
            _solve_group(job, prefix, group, mods, dict.fromkeys(group, (None, None)), layer_results, packed)
        return layer_results, packed, q, fp
    fp_experts = find_experts(fp_layer, o["keep_float"], prefix) if fp_layer is not None else {}
    fp_lin = linears(fp_layer, o["keep_float"], prefix) if fp_layer is not None else {}
    t0 = time.perf_counter()
    src = _stages(job, layer, q, [experts[g[0]].entry if g[0] in experts else mods[g[0]] for g in groups])
    fp_src = None
    try:
        if fp_layer is not None:
            fp_src = _stages(job, fp_layer, fp, [fp_experts[g[0]].entry if g[0] in experts else fp_lin[g[0]]
                                                 for g in groups])
        stats.forward_s += time.perf_counter() - t0
        for group in groups:
            if group[0] in experts:
                calls = _calls(job, src, fp_src, experts[group[0]].entry,
                               fp_experts[group[0]].entry if fp_src is not None else None)
                _quantize_experts(job, prefix, experts[group[0]], fp_experts.get(group[0]), mods, calls, q,
                                  layer_results, packed)
            else:
                calls = _calls(job, src, fp_src, mods[group[0]], fp_lin.get(group[0]))
                H, dxxt = _group_hessian(job, mods[group[0]], calls, q)
                _solve_group(job, prefix, group, mods, dict.fromkeys(group, (H, dxxt)), layer_results, packed)
        t0 = time.perf_counter()
        q = src.outputs()
        fp = fp_src.outputs() if fp_src is not None else None
        stats.forward_s += time.perf_counter() - t0
    finally:
        src.close()
        if fp_src is not None:
            fp_src.close()
    return layer_results, packed, q, fp


def _quantize_experts(job: _Job, prefix: str, ex: FusedExperts | ExpertList, fp_ex, mods, calls, q, layer_results,
                      packed) -> None:
    """An MoE layer's experts, a chunk of experts at a time (expert_hessians.py): each expert's gate and up on its
    routed tokens' Hessian, then its down on the Hessian of its own quantized ``act(gate)·up``. ``calls``: as
    ``_calls`` gives them for the experts' entry module."""
    o, gptaq = job.opts, fp_ex is not None
    routed = eh.capture(job, ex, fp_ex, calls, q)
    job.stats.held("activations", [t for rs in routed.values() for r in rs for t in (r.x, r.x_fp) if t is not None])
    counts = eh.count(job, ex, routed)
    policy = counts.policy(o["moe_calibration"], o["moe_min_tokens"])
    block = eh.block_hessian(job, routed, gptaq, ex.hidden) if any(p != "routed" for p in policy) else None
    for chunk in eh.chunks(ex, gptaq):
        hs = eh.chunk_hessians(job, ex, fp_ex, routed, chunk, counts, policy, False, block)
        names = {e: ex.stages(e) for e in chunk}
        _solve_group(job, prefix, [n for e in chunk for n in names[e][0]], mods,
                     {n: hs[e] for e in chunk for n in names[e][0]}, layer_results, packed)
        hs = eh.chunk_hessians(job, ex, fp_ex, routed, chunk, counts, policy, True, None)
        _solve_group(job, prefix, [n for e in chunk for n in names[e][1]], mods,
                     {n: hs[e] for e in chunk for n in names[e][1]}, layer_results, packed)
        del hs
    job.stats.experts[prefix + ex.name] = dict(tokens=counts.tokens, sequences=counts.sequences, policy=policy)
    if o["moe_calibration"] == "routed":
        none = [e for e, p in enumerate(policy) if p == "all tokens"]
        few = [e for e, p in enumerate(policy) if p == "blended"]
        if none:
            _say(o["log"], f"{prefix + ex.name}: experts {none} got no routed token: solved on every token")
        if few:
            _say(o["log"], f"{prefix + ex.name}: experts {few} got fewer than {o['moe_min_tokens']} routed tokens: "
                           "their Hessians blended with every token's")


ONE_PASS = True  # each layer's forward run once, paused at each group (stages.py); False: re-run per group
MAX_PAUSED = 64  # forwards paused at once per stream: each is a thread (with, on a CPU, its own OpenMP pool)


def _stages(job: _Job, layer, streams, stops) -> Stages | Replay:
    """The layer's forward on this rank's micro-batches, paused at each group's entry module (``stops``): one pass
    when the streams wait on the device and what the paused forwards hold fits, else re-run per group."""
    if ONE_PASS and job.store == job.device and sum(map(len, streams.values())) <= MAX_PAUSED \
            and _paused_fit(job, layer):
        return Stages(layer, streams, stops, job.device, job.store)
    return Replay(layer, streams, job.device, job.store)


def _paused_fit(job: _Job, layer) -> bool:
    """Paused forwards hold, per token, about the layer's input, its residual and its widest intermediate (the MLP's
    before down_proj): (2 + widest / hidden) streams, checked against free memory as the streams themselves are."""
    hidden = job.model.get_input_embeddings().weight.shape[1]
    widest = max((m.out_features for m in layer.modules() if isinstance(m, nn.Linear)), default=hidden)
    held = int(_stream_bytes(job, job.opts["method"] == "gptaq") * (2 + widest / hidden))
    return fits(held, free_bytes(job.device))


def _calls(job: _Job, src, fp_src, module, fp_module):
    """(shard, batch, the call of ``module``, that of ``fp_module`` in GPTAQ's float layer) per micro-batch, in
    shard order; the forwards' time counted."""
    it = src.calls(module)
    fit = fp_src.calls(fp_module) if fp_src is not None else None
    while True:
        t0 = time.perf_counter()
        got = next(it, None)
        fp_got = next(fit) if got is not None and fit is not None else None
        job.stats.forward_s += time.perf_counter() - t0
        if got is None:
            return
        assert fp_got is None or fp_got[:2] == got[:2], "the two streams' micro-batches out of step"
        yield got[0], got[1], got[2], (fp_got[2] if fp_got is not None else None)


def _stream_bytes(job: _Job, gptaq: bool) -> int:
    """What this rank's calibration streams of one layer take (the hidden size and dtype of the embeddings)."""
    emb = job.model.get_input_embeddings().weight
    tokens = sum(ids.numel() for s in job.mine for ids in job.shards.batches[s])
    return tokens * emb.shape[1] * emb.element_size() * (2 if gptaq else 1)


def _group_hessian(job: _Job, module, calls, q):
    """Mean Hessian (and GPTAQ cross term) of the input shared by one group (``calls``: as ``_calls`` gives them):
    each of this rank's shards summed on its own, the shards' sums added in shard order in float64 over all ranks,
    then normalised once."""
    stats, d, gptaq = job.stats, module.in_features, job.opts["method"] == "gptaq"
    sums = ShardSums(job.world, job.shards.owner)
    for s in job.mine:
        acc = HessianAccumulator(d, weighting=job.opts["weighting"], cross_term=gptaq, device=job.device)
        for _ in q[s]:
            s_at, bi, call, fp_call = next(calls)
            assert s_at == s, "micro-batches out of shard order"
            n, L = q[s][bi].hidden.shape[:2]
            x = _by_sequence(call[0][0], n, L, module)
            x_fp = _by_sequence(fp_call[0][0], n, L, module) if gptaq else None
            t1 = time.perf_counter()
            acc.add(x, [L] * n, x_fp=x_fp)  # 16-bit activations go to the tensor cores as they are
            stats.hessian_s += time.perf_counter() - t1
        sums.add(s, acc.sums(), (acc.n_sequences, acc.n_tokens))
    _wait(job)
    t0 = time.perf_counter()
    totals, (n_sequences, n_tokens) = sums.total([(d, d)] * (2 if gptaq else 1), job.device)
    stats.reduce_s += time.perf_counter() - t0
    stats.ordered_entries += sums.wide
    n = n_sequences if job.opts["weighting"] == "sequence" else n_tokens
    mean = [t.to(torch.float32) * (2.0 / n) for t in totals]  # as HessianAccumulator.finalize on the fp32 sum
    stats.held("hessian", [*totals, *mean, *(t for part in sums.mine.values() for t in part)] +
               (acc.sums() if job.mine else []))
    return mean[0], (mean[1] if gptaq else None)


def _by_sequence(x: torch.Tensor, n: int, L: int, module) -> torch.Tensor:
    """A module's input as [n, L, d]: an MoE block flattens its tokens to [n·L, d], sequence-major; some attentions
    add a dimension of one ([n, 1, L, r] in DeepSeek's MLA)."""
    lead = [s for s in x.shape[:-1] if s != 1]
    if lead in ([n, L], [n * L]) or (n * L == 1 and not lead) or (n == 1 and lead == [L]) or (L == 1 and lead == [n]):
        return x.reshape(n, L, x.shape[-1])
    raise RuntimeError(f"{type(module).__name__} sees inputs of shape {tuple(x.shape)} for a batch of {n} sequences "
                       f"of {L} tokens: not every token (experts kept as separate Linears are not supported yet)")


def _wait(job: _Job) -> None:
    """Meet the other ranks before a collective, so that its time is its own and the waiting is counted apart."""
    if job.world.size > 1:
        t0 = time.perf_counter()
        job.world.barrier()
        job.stats.wait_s += time.perf_counter() - t0


def _solve_group(job: _Job, prefix: str, group: list[str], mods: dict, hessians: dict, layer_results, packed) -> None:
    """The group's modules solved on the ranks schedule.py assigns, shared with every rank, and written into the
    working copy (later groups and the next layer see the quantized weights). ``hessians``: name -> (H, dxxt)."""
    o, stats, world = job.opts, job.stats, job.world
    full = {name: prefix + name for name in group}
    settings = {name: module_settings(full[name], job.base, o["overrides"]) for name in group}
    shapes = {full[n]: tuple(mods[n].weight.shape) for n in group}
    owner = assign_solves(shapes, o["method"], world.size)
    local = {}
    for batch in _solve_batches([n for n in group if owner[full[n]] == world.rank], shapes, full, settings):
        s = settings[batch[0]]
        Ws = [mods[n].weight.data for n in batch]
        dev = Ws[0].device
        if dev.type == "cuda":  # (the run's peak so far is kept before the device's counter restarts)
            stats.peak_memory_mb = max(stats.peak_memory_mb, _peak_memory_mb(dev))
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        if o["method"] == "rtn":
            rs = [rtn_quantize(W, s["bits"], s["group_size"], job.solve_kw["sym"], mse=job.solve_kw["mse"],
                               name=full[n]) for W, n in zip(Ws, batch, strict=True)]
        else:
            kw = dict(job.solve_kw, reg=resolved_reg(job.solve_kw["reg"], s["bits"]))  # a batch has one bit width
            factors = {}  # one factorisation per Hessian: gate and up (q/k/v, an expert's gate and up) share it
            for n in batch:
                H, dxxt = hessians[n]
                if (id(H), id(dxxt)) not in factors:
                    factors[id(H), id(dxxt)] = gptq_factor(H, act_order=kw["act_order"], damp=kw["damp"], dxxt=dxxt,
                                                           alpha=o["alpha"], reg=kw["reg"], name=full[n])
            hd = [hessians[n] for n in batch]
            gptaq = hd[0][1] is not None
            rs = gptq_quantize_batched(Ws, [h for h, _ in hd], s["bits"], s["group_size"], alpha=o["alpha"],
                                       dxxts=[d for _, d in hd] if gptaq else None, names=[full[n] for n in batch],
                                       factors=[factors[id(h), id(d)] for h, d in hd], **kw)
            del factors
        dt = (time.perf_counter() - t0) / len(batch)  # a batch's time, shared by its modules
        stats.solve_s += dt * len(batch)
        if dev.type == "cuda":
            mb = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
            stats.memory_mb["solve"] = round(max(stats.memory_mb.get("solve", 0.0), mb), 3)
        for n, r in zip(batch, rs, strict=True):
            local[full[n]] = {"codes": r.codes.to("cpu", torch.uint8), "scales": r.scales.cpu(),
                              "zeros": r.zeros.to("cpu", torch.int32), "g_idx": r.g_idx.to("cpu", torch.int32),
                              "numbers": torch.tensor([float(r.loss), float(r.damp), dt], dtype=torch.float64)}
            if o["callback"] is not None:
                o["callback"](full[n], hessians[n][0], r)
        del rs
    layout = {}
    for name in group:
        (N, K), gs = shapes[full[name]], settings[name]["group_size"]
        G = 1 if gs == -1 else K // gs
        layout[full[name]] = (("codes", (N, K), torch.uint8), ("scales", (N, G), torch.float32),
                              ("zeros", (N, G), torch.int32), ("g_idx", (K,), torch.int32),
                              ("numbers", (3,), torch.float64))
    _wait(job)
    t0 = time.perf_counter()
    shared = world.share(owner, local, layout)
    stats.reduce_s += time.perf_counter() - t0
    for name in group:
        rec, s = shared[full[name]], settings[name]
        loss, damp, dt = rec["numbers"].tolist()
        m = dict(loss=loss, damp=damp, bits=s["bits"], group_size=s["group_size"], sym=job.solve_kw["sym"])
        r = rebuild(full[name], {f"{full[name]}.{k}": v for k, v in rec.items()}, m)
        W = mods[name].weight.data
        W.copy_(r.weight.to(W.device, W.dtype))  # every rank the same bits, whichever solved it
        if job.state is not None:  # what the resume commit writes: codes as bytes, never the float weight
            layer_results[full[name]] = {f: rec[f] for f in SAVED_FIELDS}
        t0 = time.perf_counter()
        packed[full[name]] = _packed(r, mods[name], o["checkpoint_format"])
        stats.pack_s += time.perf_counter() - t0
        stats.modules[full[name]] = dict(m, seconds=round(dt, 4))
        _say(o["log"], f"{full[name]}: {s['bits']}-bit g{s['group_size']}, loss {loss:.4g}, damp {damp:.3g}, "
                       f"{dt:.2f} s")


MAX_BATCH = 16  # modules solved together (one sweep launch per column block on a GPU): 16 experts' factors and
# stacked weights of a Qwen3-30B-A3B layer take ~0.5 GB


def _solve_batches(names: list[str], shapes: dict, full: dict, settings: dict) -> list[list[str]]:
    """This rank's modules of a group in runs of one shape and one setting, in group order, at most MAX_BATCH each
    (on a CPU gptq_quantize_batched solves them one by one, so the bits never depend on the batching)."""
    runs: dict[tuple, list[str]] = {}
    for n in names:
        runs.setdefault((shapes[full[n]], settings[n]["bits"], settings[n]["group_size"]), []).append(n)
    return [run[i:i + MAX_BATCH] for run in runs.values() for i in range(0, len(run), MAX_BATCH)]


def _packed(r: GPTQResult, linear: nn.Linear, checkpoint_format: str) -> QuantLinear:
    """The QuantLinear of one solved module on the CPU (its bias in fp16): what a finished layer keeps."""
    bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float16)
    return QuantLinear.from_gptq(r, bias=bias, checkpoint_format=checkpoint_format)


def _moe_meta(job: _Job) -> None:
    """The experts' calibration policy and per-expert counts, in the checkpoint's meta."""
    if job.stats.experts:
        # "experts", not "moe": GPTQModel reads meta["moe"] as its own MoE settings
        job.qcfg["meta"]["experts"] = dict(calibration=job.opts["moe_calibration"],
                                           min_tokens=job.opts["moe_min_tokens"], modules=job.stats.experts)


def _install(model: nn.Module, results: dict[str, QuantLinear], home, qcfg: dict) -> None:
    """Replace each quantized Linear by its QuantLinear, each fused-experts module by ``Experts`` of QuantLinear
    modules, and set the config; all or nothing."""
    new = {name: q.to(home) for name, q in results.items()}
    swapped: list[tuple[str, nn.Module]] = []
    had_cfg = "quantization_config" in vars(model.config)
    try:
        swapped += make_room(model, new)  # per-expert places first, filled below
        for name, q in new.items():
            swapped.append((name, swap(model, name, q)))
        model.config.quantization_config = qcfg
    except BaseException:
        for name, old in reversed(swapped):
            swap(model, name, old)
        if had_cfg:
            model.config.quantization_config = None  # _refuse_quantized saw None there
        else:
            vars(model.config).pop("quantization_config", None)
        raise


def _quant_config(bits, group_size, sym, act_order, static_groups, checkpoint_format, method, weighting, calib,
                  overrides, keep_float, damp, mse) -> dict:
    from ..checkpoint import quantization_config

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
    try:  # this process's own peak (ru_maxrss also holds the peak of its pre-exec address space: its parent's)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
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


__all__ = ["METHODS", "STUDY_REG", "QuantizeStats", "check_settings", "quantize_model", "resolved_reg"]
