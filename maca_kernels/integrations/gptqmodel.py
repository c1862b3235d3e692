"""GPTQModel on maca_kernels: its GPTQ / GPTAQ accumulate with ``HessianAccumulator`` and solve with
``gptq_quantize``, with MaCa (per-sequence) weighting one argument away::

    from maca_kernels.integrations import gptqmodel as mk_gptqmodel
    with mk_gptqmodel.backend(weighting="sequence"):        # or "token": the tool's own statistic
        model.quantize(calibration)

GPTQModel hands each calibration sample to ``GPTQ.add_batch`` with its padding already removed, so every
add is one (or B equal-length) sequence(s): ``weighting="sequence"`` weights each by 1/n_s. Options mapped
from the module's ``QuantizeConfig``: bits (2/3/4/8), group_size, sym, desc_act, act_group_aware (GAR:
the tool's permutation, our solve), static_groups, damp_percent with damp_auto_increment (the tool's
escalation grid, then ours), mse (0 or 2.4, GPTQModel's default grid), GPTAQ's alpha, the few-samples
fallback (left to the tool, which does not read H). Anything else that changes the math (mock
quantization, FOEM, QQQ, convolution or embedding modules, tensor-parallel padding, other mse norms)
raises ``UnsupportedOption``. Patches are class attributes, put back on exit even after an exception.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch

from ..ops.gptq import NotPositiveDefiniteError, gptq_quantize
from ..ops.hessian.accumulator import HessianAccumulator
from ._patch import Patch, check_version, neutralized, scoped, sequence_lengths

TESTED_VERSIONS = ("7.7",)
WEIGHTINGS = ("token", "sequence")
# The range search our kernels implement: GPTQ's own (norm 2.4, 100-step grid, shrink to 0.2).
OUR_MSE_NORM = 2.4


class UnsupportedOption(ValueError):
    """A GPTQModel option this backend cannot reproduce (raised instead of being ignored)."""


_lock = threading.Lock()
_active: dict | None = None


def enable(weighting: str = "token", *, op_backend: str | None = None) -> None:
    """Patch GPTQModel's GPTQ and GPTAQ. ``weighting``: "token" reproduces the tool's Hessian (Σ xxᵀ over
    unpadded tokens), "sequence" is MaCa (each calibration sequence one sample). ``op_backend`` is passed
    to the ops (None picks by device)."""
    global _active
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    with _lock:
        if _active is not None:
            raise RuntimeError("the maca_kernels GPTQModel backend is already enabled: disable() it first")
        version = check_version("gptqmodel", TESTED_VERSIONS)
        from gptqmodel.quantization.gptaq import GPTAQ
        from gptqmodel.quantization.gptq import GPTQ

        patch = Patch()
        try:
            from gptqmodel.quantization.foem import FOEM

            patch.set(GPTQ, "add_batch", _make_add_batch(GPTQ.add_batch))
            patch.set(GPTQ, "materialize_global_hessian", _make_materialize(GPTQ.materialize_global_hessian))
            patch.set(GPTQ, "adopt_hessian_from", _make_adopt(GPTQ.adopt_hessian_from))
            patch.set(GPTQ, "quantize", _make_quantize(GPTQ.quantize))
            patch.set(GPTAQ, "add_batch", _make_add_batch(GPTAQ.add_batch))
            patch.set(GPTAQ, "quantize", _make_quantize(GPTAQ.quantize))
            patch.set(FOEM, "add_batch", _refuse("FOEM"))
        except BaseException:
            patch.undo()
            raise
        _active = dict(weighting=weighting, op_backend=op_backend, patch=patch, version=version,
                       classes=(GPTQ, GPTAQ), live=weakref.WeakSet())


def disable() -> None:
    """Undo :func:`enable` (a no-op when not enabled). Tasks that accumulated with us but were not solved yet get our
    Hessian (and GPTAQ's cross term) handed to the tool, so its own quantize can finish them. Every patch is put
    back even when a hand-back fails."""
    _disable(hand_back=True)


def _abandon() -> None:
    """:func:`disable` after a failed run: nothing will solve our partial sums, so they are dropped, not handed back."""
    _disable(hand_back=False)


def _disable(hand_back: bool) -> None:
    global _active
    with _lock:
        act, _active = _active, None
        if act is None:
            return
        try:
            for task in list(act["live"]):
                if hand_back:
                    _hand_back(task)
                else:
                    task.__dict__.pop("_mk_state", None)
        finally:
            act["patch"].undo()


def _hand_back(task) -> None:
    with task.lock:
        st = task.__dict__.pop("_mk_state", None)
        if st is None:
            return
        acc = st.merge(st.device or torch.device("cpu"))
        if acc is None or acc.n_samples == 0:  # nothing added (a first add that failed): the tool's task as it was
            return
        task.H = acc.finalize()
        if st.cross_term:
            task.dXXT = acc.finalize_cross()
        task._hessian_dirty = False


def is_enabled() -> bool:
    return _active is not None


def backend(weighting: str = "token", *, op_backend: str | None = None):
    """``with backend(weighting="sequence"): model.quantize(...)`` — enabled inside, restored on exit. An exception
    in the body propagates unchanged, with every patch undone and our partial sums dropped."""
    return scoped(lambda: enable(weighting, op_backend=op_backend), disable, _abandon)


# ---------------------------------------------------------------- which tasks we take over


def _ours(task, act) -> bool:
    """Plain GPTQ / GPTAQ tasks of Linear layers; anything else must be refused before it runs."""
    GPTQ, GPTAQ = act["classes"]
    if type(task) not in (GPTQ, GPTAQ):
        raise UnsupportedOption(
            f"module {task.name}: {type(task).__name__} is not GPTQ or GPTAQ; the maca_kernels backend covers "
            "those two. Quantize this model outside `mk_gptqmodel.backend()`."
        )
    if not isinstance(task.module, torch.nn.Linear):
        raise UnsupportedOption(f"module {task.name}: only nn.Linear layers are supported, got "
                                f"{type(task.module).__name__}")
    if task._tp_pad_cols:
        raise UnsupportedOption(f"module {task.name}: tensor-parallel column padding is not supported")
    return True


class _State:
    """Our side of one task: accumulators per device (merged at materialisation), weighting fixed at first add."""

    def __init__(self, columns: int, weighting: str, cross_term: bool, op_backend):
        self.columns, self.weighting, self.cross_term, self.op_backend = columns, weighting, cross_term, op_backend
        self.accs: dict[torch.device, HessianAccumulator] = {}
        self.merged: HessianAccumulator | None = None
        self.device: torch.device | None = None

    def add(self, x, x_fp, name):
        if x.numel() == 0:
            return 0
        x2, lengths = sequence_lengths(x, f"module {name}")
        acc = self.accs.get(x2.device)
        if acc is None:
            # no finiteness check per add: a NaN reaches H as it does in the tool, which then recovers
            acc = self.accs[x2.device] = HessianAccumulator(
                self.columns, weighting=self.weighting, cross_term=self.cross_term, device=x2.device,
                check_finite=False, backend=self.op_backend)
            self.device = self.device or x2.device
        fp = None if x_fp is None else sequence_lengths(x_fp.to(x2.device, x2.dtype), f"module {name}")[0]
        acc.add(x2, lengths, x_fp=fp)
        return x2.shape[0]

    def merge(self, device) -> HessianAccumulator | None:
        for acc in self.accs.values():
            moved = HessianAccumulator(self.columns, weighting=self.weighting, cross_term=self.cross_term,
                                       device=device, check_finite=False)
            moved.merge(acc)
            self.merged = moved if self.merged is None else self.merged.merge(moved)
        self.accs.clear()
        return self.merged


def _state(task, act) -> _State:
    st = task.__dict__.get("_mk_state")
    if st is None:
        GPTQ, GPTAQ = act["classes"]
        st = task._mk_state = _State(task.columns, act["weighting"], type(task) is GPTAQ, act["op_backend"])
        act["live"].add(task)
    return st


# ---------------------------------------------------------------- the patched methods


def _refuse(method: str):
    def add_batch(self, *args, **kwargs):
        raise UnsupportedOption(f"module {self.name}: {method} is not supported by the maca_kernels backend; "
                                "quantize this model outside `mk_gptqmodel.backend()`")

    return add_batch


def _make_add_batch(original):
    def add_batch(self, inp, out, batch_index=None):
        act = _active  # one snapshot per call: disable() may run on another thread
        if act is None:
            return original(self, inp, out, batch_index)
        if "_mk_state" not in self.__dict__:
            # Refuse here, on the calibration thread: GPTQModel ends the process when a quantize worker raises.
            _ours(self, act)
            _solver_options(self, act)
        GPTQ, GPTAQ = act["classes"]
        x_fp = self.native_inps.pop(0) if type(self) is GPTAQ else None  # the tool's own pairing
        with self.lock:
            tokens = _state(self, act).add(inp, x_fp, self.name)
            if tokens:
                self.fwd_counter += 1
                self.nsamples += tokens
                self._hessian_dirty = True

    return add_batch


def _make_adopt(original):
    def adopt_hessian_from(self, leader):
        act = _active
        if act is not None:  # a follower never adds batches: check its options here, on the calibration thread
            _ours(self, act)
            _solver_options(self, act)
        return original(self, leader)

    return adopt_hessian_from


def _make_materialize(original):
    def materialize_global_hessian(self, target_device=None):
        st = self.__dict__.get("_mk_state")
        if _active is None or st is None:
            return original(self, target_device)
        with self.lock:
            device = self._select_hessian_target_device(target_device)
            if self._hessian_dirty or self.H is None:
                acc = st.merge(device)
                self.H = acc.finalize() if acc is not None else torch.zeros(self.columns, self.columns,
                                                                             device=device)
                self._hessian_dirty = False
            elif self.H.device != device:
                self.H = self.H.to(device)
            self._final_hessian_device_hint = device

    return materialize_global_hessian


def _solver_options(task, act) -> dict:
    q = task.qcfg
    name = task.name
    if getattr(q, "mock_quantization", False):
        raise UnsupportedOption(f"module {name}: mock_quantization skips the solve; nothing to accelerate")
    if getattr(q, "foem", None) is not None:
        raise UnsupportedOption(f"module {name}: FOEM is not supported by the maca_kernels backend")
    if type(task.quantizer).__name__ != "Quantizer":
        raise UnsupportedOption(f"module {name}: quantizer {type(task.quantizer).__name__} is not supported")
    bits = q.bits
    if bits not in (2, 3, 4, 8):
        raise UnsupportedOption(f"module {name}: bits = {bits!r}; the backend solves 2, 3, 4 and 8 bits")
    mse = float(getattr(q, "mse", 0.0) or 0.0)
    if mse not in (0.0, OUR_MSE_NORM):
        raise UnsupportedOption(f"module {name}: mse = {mse}; the backend's range search uses norm {OUR_MSE_NORM}")
    if mse and bits == 2 and not q.sym:
        raise UnsupportedOption(f"module {name}: mse at 2 bits asymmetric also searches adjacent zero points "
                                "in GPTQModel; the backend does not")
    if getattr(task.quantizer, "grid", 100) != 100 or getattr(task.quantizer, "maxshrink", 0.8) != 0.8:
        raise UnsupportedOption(f"module {name}: a quantizer grid other than 100 steps / shrink 0.8")
    if int(q.group_size) > 0 and task.columns % int(q.group_size):
        raise UnsupportedOption(f"module {name}: in_features = {task.columns} is not a multiple of group_size = "
                                f"{q.group_size} (the backend has no partial last group)")
    damp = float(q.damp_percent)
    inc = float(q.damp_auto_increment or 0.0)
    steps = []  # the tool's grid (damp + k·inc, below 1), then ours above it
    while inc > 0 and (nxt := (steps[-1] if steps else damp) + inc) < 1.0:
        steps.append(nxt)
    steps += [s for s in (1.0, 3.0, 10.0) if s > (steps[-1] if steps else damp)]
    return dict(bits=bits, group_size=int(q.group_size), sym=bool(q.sym), act_order=bool(q.desc_act),
                static_groups=bool(q.static_groups), damp=damp, damp_steps=tuple(steps), mse=bool(mse),
                backend=act["op_backend"], name=name, compute_loss=False)


def _gar_perm(task, H):
    """GPTQModel's group-aware reordering (GAR): groups by their largest diag(H), columns inside a group by
    diag(H); whole groups move, so group membership is unchanged."""
    from gptqmodel.quantization.gar import compose_final_perm, compute_global_perm, compute_local_perms

    g = int(task.qcfg.group_size)
    diag = torch.diag(H).clone()
    diag[diag == 0] = 1.0  # dead columns, as the tool neutralises them before ordering
    local, values = compute_local_perms(diag, g, return_values=True)
    return compose_final_perm(local, compute_global_perm(diag, g, precomputed_values=values), g)


def _make_quantize(original):
    def quantize(self, blocksize=128):
        act = _active
        st = self.__dict__.get("_mk_state")
        # A follower of a shared-input group never adds batches: it adopts its leader's H (ours) instead.
        if act is None or (st is None and self.H is None):
            return original(self, blocksize)
        from gptqmodel.utils.fallback import should_use_fallback

        GPTQ, GPTAQ = act["classes"]
        if type(self) is GPTQ and should_use_fallback(self.fallback, float(self.nsamples), self.expected_nsamples):
            self.__dict__.pop("_mk_state", None)  # the tool's RTN-style fallback never reads H: free our sums
            return original(self, blocksize)
        try:
            return _solve(self, act, st, blocksize)
        except NotPositiveDefiniteError:
            pass
        _hand_back(self)  # H not finite or not positive definite even with damping: the tool's own recovery
        return original(self, blocksize)

    return quantize


def _solve(self, act, st, blocksize):
    """Our accumulation and solve for one task; returns the tuple GPTQModel's quantize returns."""
    GPTQ, GPTAQ = act["classes"]
    opts = _solver_options(self, act)
    start = time.time()
    gptaq = type(self) is GPTAQ
    self.materialize_global_hessian(getattr(self.module, "target_device", None))
    H = self.H
    dxxt = st.merged.finalize_cross().to(H.device) if gptaq else None
    if not torch.isfinite(H).all() or (dxxt is not None and not torch.isfinite(dxxt).all()):
        raise NotPositiveDefiniteError(f"module {self.name}: the Hessian is not finite")
    W = self.clone_module(device=H.device)
    perm = None
    if not gptaq and self.qcfg.act_group_aware and not opts["act_order"]:
        perm = _gar_perm(self, H).to(H.device)
    Wp, Hp = (W, H) if perm is None else (W[:, perm], H[perm][:, perm])
    extra = dict(dxxt=dxxt, alpha=float(self.qcfg.gptaq.alpha)) if gptaq else {}
    r = gptq_quantize(Wp, Hp, block_size=int(blocksize), **opts, **extra)
    Q, scale, zero = r.weight, r.scales, r.zeros.to(torch.float32)
    if perm is not None:  # back to the original column and group order
        g = opts["group_size"]
        Q = torch.empty_like(Q).index_copy_(1, perm, Q)
        groups = perm.view(-1, g)[:, 0] // g  # original group of each processed group
        scale = torch.empty_like(scale).index_copy_(1, groups, scale)
        zero = torch.empty_like(zero).index_copy_(1, groups, zero)
    # GAR keeps groups of original columns; otherwise the solver's g_idx (act-order may reorder them)
    g_idx = r.g_idx if perm is None else torch.arange(self.columns, device=Q.device) // opts["group_size"]
    avg_loss = _avg_loss(W, H, Q, r.damp, self.nsamples, dxxt, r.perm, extra.get("alpha", 0.0))
    weight = self.module.weight
    Q = Q.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)
    self.H = None
    self.__dict__.pop("_mk_state", None)
    return (Q, scale, zero, g_idx.to(torch.int32), time.time() - start, avg_loss, r.damp, self.nsamples)


def _avg_loss(W, H, Q, damp, nsamples, dxxt, perm, alpha) -> float:
    """GPTQModel's reported loss: Σ over columns of err²/2 (err = (w − q)/U_ii of the sweep), over the token
    count. For GPTQ Σ err² = tr(ΔW H_d ΔWᵀ) with the damped H; for GPTAQ (updates W −= err·U − w·P),
    E (U − D·P) = ΔW + Q·P in processing order, D = diag(U), so Σ err² = ‖(ΔW + Q·P)(U − D·P)⁻¹‖²."""
    W, H, dead = neutralized(W, H, damp)
    dW = W - Q
    if dxxt is None:
        total = float(((dW @ H) * dW).sum())
    else:  # processing order (our result's perm); U and P as the solver builds them
        dxxt = dxxt.clone()
        dxxt[:, dead] = 0.0
        dxxt[dead, :] = 0.0
        Hp, Dp, dWp, Qq = H[perm][:, perm], dxxt[perm][:, perm], dW[:, perm], Q[:, perm]
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
        P = alpha * ((Dp @ U.T).triu(1)) @ U
        M = U - U.diagonal()[:, None] * P
        E = torch.linalg.solve_triangular(M, dWp + Qq @ P, upper=True, left=False)
        total = float((E * E).sum())
    return total / 2 / max(nsamples, 1)
