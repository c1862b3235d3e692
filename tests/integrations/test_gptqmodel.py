"""GPTQModel's GPTQ / GPTAQ on the maca_kernels backend, through the tool's own ``load(...).quantize(...)`` on
a tiny Llama (runs in the GPTQModel venv: ``make interop``; skipped elsewhere)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # read at import: 2-core machines otherwise get 1 worker
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("gptqmodel")

from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: E402
from gptqmodel.quantization.config import GPTAQConfig  # noqa: E402
from gptqmodel.quantization.foem import FOEM  # noqa: E402
from gptqmodel.quantization.gptaq import GPTAQ  # noqa: E402
from gptqmodel.quantization.gptq import GPTQ  # noqa: E402

import maca_kernels as mk  # noqa: E402
from maca_kernels import _native  # noqa: E402
from maca_kernels.integrations import _patch  # noqa: E402
from maca_kernels.integrations import gptqmodel as mk_gptqmodel  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tool_models import LENGTHS, calibration, save_tiny_model  # noqa: E402

ORIGINAL = {name: vars(GPTQ)[name] for name in ("add_batch", "materialize_global_hessian", "quantize")}
LEADER = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
          "mlp.up_proj": "mlp.gate_proj"}  # GPTQModel's shared-input groups: followers adopt the leader's H


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gptqmodel"))


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GPTQModel writes logs/ into the working directory


def quantize(model_dir, weighting=None, **cfg):
    qcfg = QuantizeConfig(**{"bits": 4, "group_size": 128, "offload_to_disk": False, **cfg})
    qm = GPTQModel.load(model_dir, qcfg, device="cpu", dtype=torch.float32)
    args = dict(batch_size=1, calibration_concat_size=None, calibration_sort=None, calibration_data_min_length=0)
    if weighting is None:
        ret = qm.quantize(calibration(), **args)
    else:
        with mk_gptqmodel.backend(weighting=weighting):
            ret = qm.quantize(calibration(), **args)
    losses = {}
    for rows in ret.values():
        for r in rows:
            if "loss" in r and "layer" in r:
                losses[f"model.layers.{r['layer']}.{r['module']}"] = float(r["loss"])
    return qm, losses


CONFIGS = [
    dict(),  # GPTQModel's defaults: sym, act_group_aware (GAR), damp 0.05 with auto-increment
    dict(desc_act=True, act_group_aware=False),
    dict(desc_act=True, act_group_aware=False, static_groups=True),
    dict(sym=False, act_group_aware=False),
    dict(bits=3, sym=False),
    dict(bits=2, sym=True),
    dict(bits=8),
    dict(mse=2.4),
    dict(gptaq=GPTAQConfig(alpha=0.25, device="cpu")),
    dict(gptaq=GPTAQConfig(alpha=0.25, device="cpu"), desc_act=True, sym=False),
]


def cfg_id(c):
    return "-".join(f"{k}={'gptaq' if k == 'gptaq' else v}" for k, v in c.items()) or "defaults"


def tool_and_ours_on_the_same_inputs(monkeypatch):
    """Inside the backend run, each module is also solved by the tool's own GPTQ / GPTAQ on the very H and W
    ours gets: {name: (tool's loss, our loss)} per module (names prefixed by their layer)."""
    pairs, seen = {}, {}
    make = mk_gptqmodel._make_quantize

    def make_twin(original):
        ours = make(original)

        def quantize(self, blocksize=128):
            st = self.__dict__.get("_mk_state")
            self.materialize_global_hessian(None)
            H = self.H.clone()
            if isinstance(self, GPTAQ):
                self.dXXT = st.merged.finalize_cross()
            theirs = original(self, blocksize)  # consumes H (and dXXT)
            self.H, self._hessian_dirty = H, False
            if st is not None:
                self._mk_state = st
            mine = ours(self, blocksize)
            layer = seen[self.name] = seen.get(self.name, -1) + 1
            pairs[f"model.layers.{layer}.{self.name}"] = (theirs[5], mine[5])
            return mine

        return quantize

    monkeypatch.setattr(mk_gptqmodel, "_make_quantize", make_twin)
    return pairs


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_per_module_losses_match_the_tool(model_dir, monkeypatch, cfg):
    _, theirs = quantize(model_dir, **cfg)
    pairs = tool_and_ours_on_the_same_inputs(monkeypatch)
    _, ours = quantize(model_dir, weighting="token", **cfg)
    assert set(ours) == set(theirs) == set(pairs) and len(ours) == 14
    for name, (tool, mine) in pairs.items():  # the same H and W: the solves agree
        assert mine == pytest.approx(tool, rel=0.01), name
        assert ours[name] == pytest.approx(mine, rel=1e-6, abs=1e-10), "the tool logs the loss our backend returned"
    # whole runs (each layer's input comes from its own quantized layers): the same on average
    ratios = torch.tensor([ours[n] / theirs[n] for n in theirs])
    assert abs(float(ratios.mean()) - 1) < 0.01 and float((ratios - 1).abs().max()) < 0.05
    assert {n: vars(GPTQ)[n] for n in ORIGINAL} == ORIGINAL, "patch removed on exit"


class Recorder:
    """Layer inputs as our accumulator sees them and the H handed to each solve, in call order."""

    def __init__(self, monkeypatch):
        self.inputs, self.solved, self.checked = {}, {}, []
        rec = self
        add, solve = mk_gptqmodel._State.add, mk_gptqmodel.gptq_quantize

        def spy_add(self_, x, x_fp, name):
            if rec.solved.pop(name, False):  # a new layer
                rec.inputs[name] = []
            rec.inputs.setdefault(name, []).append(x.detach().double().clone())
            return add(self_, x, x_fp, name)

        def spy_solve(W, H, **kw):
            name = kw["name"]
            key = name if name in rec.inputs and not rec.solved.get(name) else LEADER.get(name, name)
            rec.solved[name] = True
            rec.checked.append((name, H.detach().double().clone(), list(rec.inputs[key])))
            return solve(W, H, **kw)

        monkeypatch.setattr(mk_gptqmodel._State, "add", spy_add)
        monkeypatch.setattr(mk_gptqmodel, "gptq_quantize", spy_solve)


def test_sequence_weighting_feeds_the_maca_hessian(model_dir, monkeypatch):
    rec = Recorder(monkeypatch)
    quantize(model_dir, weighting="sequence", act_group_aware=False)
    assert len(rec.checked) == 14
    for name, H, xs in rec.checked:
        assert sorted(x.shape[1] for x in xs) == sorted(LENGTHS), name  # every sequence once, unpadded
        expect = sum(x[0].T @ x[0] / x.shape[1] for x in xs) * (2.0 / len(xs))
        assert torch.allclose(H, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max())), name
        # and not the token-weighted statistic
        X = torch.cat([x[0] for x in xs])
        assert not torch.allclose(H, 2.0 / X.shape[0] * X.T @ X, rtol=1e-2)


def test_the_tools_save_and_load_work_on_our_result(model_dir, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    results = []
    solve = mk_gptqmodel.gptq_quantize

    def keep(W, H, **kw):
        r = solve(W, H, **kw)
        results.append((kw["name"], r))
        return r

    monkeypatch.setattr(mk_gptqmodel, "gptq_quantize", keep)
    qm, _ = quantize(model_dir, weighting="sequence", desc_act=True, act_group_aware=False, sym=False)
    qm.save(str(tmp_path / "q"))
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    seen: dict[str, int] = {}
    for name, r in results:  # modules of a layer are solved before the next layer's
        layer = seen[name] = seen.get(name, -1) + 1
        prefix = f"model.layers.{layer}.{name}."
        assert torch.equal(mk.unpack_gptq(tensors[prefix + "qweight"], 4, r.codes.shape[1]), r.codes), prefix
        assert torch.equal(tensors[prefix + "g_idx"], r.g_idx), prefix
        assert torch.equal(tensors[prefix + "scales"].float().t(), r.scales), prefix
    ref = GPTQModel.load(model_dir, device="cpu", dtype=torch.float32).model  # fp model, our weights put in
    with torch.no_grad():
        layer_of: dict[str, int] = {}
        for name, r in results:
            layer = layer_of[name] = layer_of.get(name, -1) + 1
            ref.get_submodule(f"model.layers.{layer}.{name}").weight.copy_(r.weight)
        back = GPTQModel.load(str(tmp_path / "q"), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
        ids = torch.tensor([calibration()[0]])
        got = back.model(ids).logits.float()
        expect = ref(ids).logits
    assert (got - expect).abs().max() < 2e-2 * expect.abs().max()


def test_unsupported_option_raises_and_the_patch_is_undone(model_dir):
    with pytest.raises(mk_gptqmodel.UnsupportedOption, match="mse = 2.0"):
        quantize(model_dir, weighting="token", mse=2.0)
    assert {n: vars(GPTQ)[n] for n in ORIGINAL} == ORIGINAL and not mk_gptqmodel.is_enabled()
    assert "add_batch" in vars(GPTAQ) and vars(GPTAQ)["add_batch"].__module__.startswith("gptqmodel")


def tool_attributes() -> dict:
    """Every attribute of the classes the backend patches, as the raw objects in their ``vars()``."""
    return {(cls.__name__, name): value for cls in (GPTQ, GPTAQ, FOEM) for name, value in vars(cls).items()}


def test_a_backend_failure_mid_run_shows_the_original_error_and_restores_the_tool(model_dir, monkeypatch):
    before = tool_attributes()
    mk_gptqmodel.enable("sequence")
    try:
        patched = {k for k, v in tool_attributes().items() if before.get(k) is not v}
    finally:
        mk_gptqmodel.disable()
    assert len(patched) >= 6  # GPTQ's add/materialize/adopt/quantize, GPTAQ's add/quantize, FOEM's refusal
    _, expect = quantize(model_dir, act_group_aware=False)  # the tool's own run, before any failure
    # the C++ extension missing: our first accumulation (inside the tool's forward hook) fails
    monkeypatch.setattr(_native, "_C", None)
    with pytest.raises(RuntimeError) as missing:
        _native.require_native("accumulate_hessian")
    with pytest.raises(BaseException) as err:
        quantize(model_dir, weighting="sequence", act_group_aware=False)
    assert type(err.value) is RuntimeError and str(err.value) == str(missing.value), "the original error, as is"
    assert not getattr(err.value, "__notes__", None), "and the cleanup had nothing to add"
    assert not mk_gptqmodel.is_enabled()
    after = tool_attributes()
    assert {k for k in patched if after.get(k) is not before.get(k)} == set(), "every patch undone"
    assert after.keys() == before.keys()
    # the user's next plain run is the tool's own (it never reaches our ops: the extension is still "missing")
    _, got = quantize(model_dir, act_group_aware=False)
    assert got == pytest.approx(expect, rel=1e-6) and len(got) == 14


def test_enable_disable_are_scoped():
    mk_gptqmodel.enable("sequence")
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            mk_gptqmodel.enable("token")
        assert vars(GPTQ)["add_batch"] is not ORIGINAL["add_batch"]
    finally:
        mk_gptqmodel.disable()
    assert {n: vars(GPTQ)[n] for n in ORIGINAL} == ORIGINAL
    mk_gptqmodel.disable()  # a no-op
    with pytest.raises(ValueError, match="weighting must be one of"):
        mk_gptqmodel.enable("tokens")
    with pytest.raises(RuntimeError, match="boom"), mk_gptqmodel.backend("token"):
        raise RuntimeError("boom")
    assert {n: vars(GPTQ)[n] for n in ORIGINAL} == ORIGINAL


def test_untested_version_warns(monkeypatch):
    monkeypatch.setattr(_patch.metadata, "version", lambda dist: "9.0.1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _patch.check_version("gptqmodel", mk_gptqmodel.TESTED_VERSIONS)
    assert any("tested with gptqmodel 7.7; found 9.0.1" in str(w.message) for w in caught)


def standalone_task(seed=0, nan=False):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data.normal_(0, 0.08)
    X = torch.randn(4, 200, 128) @ (torch.eye(128) + 0.2 * torch.randn(128, 128) / 128**0.5)
    if nan:
        X[1, 3, 5] = float("nan")
    task = GPTQ(lin, QuantizeConfig(bits=4, group_size=128, act_group_aware=False))
    task.quantizer.configure(perchannel=True)
    return task, X


def test_disable_hands_unsolved_tasks_back_to_the_tool():
    tool, X = standalone_task()
    for x in X:
        tool.add_batch(x[None], None)
    expect = tool.quantize()
    task, X = standalone_task()
    mk_gptqmodel.enable("token")
    try:
        for x in X:
            task.add_batch(x[None], None)
    finally:
        mk_gptqmodel.disable()  # before the solve: the tool gets our H and solves with its own code
    got = task.quantize()
    assert "_mk_state" not in vars(task)
    assert got[5] == pytest.approx(expect[5], rel=1e-4) and torch.allclose(got[0], expect[0], atol=1e-6)


def test_disable_after_a_failed_first_add_leaves_the_task_to_the_tool(monkeypatch):
    tool, X = standalone_task()
    for x in X:
        tool.add_batch(x[None], None)
    expect = tool.quantize()
    task, X = standalone_task()
    before = tool_attributes()
    mk_gptqmodel.enable("token")
    try:
        with monkeypatch.context() as m, pytest.raises(RuntimeError, match="C\\+\\+ extension"):
            m.setattr(_native, "_C", None)
            task.add_batch(X[0][None], None)
    finally:
        mk_gptqmodel.disable()  # nothing accumulated: nothing to hand back (and no error about it)
    assert tool_attributes() == before and "_mk_state" not in vars(task)
    for x in X:
        task.add_batch(x[None], None)
    got = task.quantize()
    assert got[5] == expect[5] and torch.equal(got[0], expect[0])


def test_a_non_finite_hessian_gets_the_tools_own_recovery():
    tool, X = standalone_task(nan=True)
    for x in X:
        tool.add_batch(x[None], None)
    expect = tool.quantize()
    task, X = standalone_task(nan=True)
    with mk_gptqmodel.backend("token"):
        for x in X:
            task.add_batch(x[None], None)
        got = task.quantize()
    assert expect[5] == got[5] == "rtn fallback"  # GPTQModel's answer to a NaN Hessian, unchanged
    assert torch.equal(got[0], expect[0])
