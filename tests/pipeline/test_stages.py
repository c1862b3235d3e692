"""One forward per decoder layer and micro-batch, paused at each group (pipeline/stages.py): the same bits as
re-running the layer for each group, for dense, MoE (fused and listed) and GPTAQ runs; an error midway leaves no
paused forward behind."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import random_sequences, tiny_model, tiny_moe

import maca_kernels.pipeline.run as run
from maca_kernels.pipeline import quantize_model
from maca_kernels.pipeline.shards import make_shards

SEQS = [16, 32, 32, 24, 8]


def quantized(model, monkeypatch, one_pass: bool, **kw):
    monkeypatch.setattr(run, "ONE_PASS", one_pass)
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
    quantize_model(model, random_sequences(SEQS, seed=2), 4, 16, progress=False, log=None, calib_shards=2,
                   max_batch_tokens=48, **kw)
    return model.state_dict(), len(calls)


@pytest.mark.parametrize("family,method,kw", [
    ("llama", "gptq", dict(act_order=True)), ("qwen3", "gptaq", {}), ("mixtral", "gptaq", {}),
    ("list", "gptq", dict(moe_min_tokens=40)), ("qwen2_moe", "gptq", {})])
def test_one_pass_gives_the_bits_of_a_forward_per_group(family, method, kw, monkeypatch):
    make = tiny_moe if family in ("mixtral", "list", "qwen2_moe") else tiny_model
    one, n_one = quantized(make(family), monkeypatch, True, method=method, **kw)
    replay, n_replay = quantized(make(family), monkeypatch, False, method=method, **kw)
    assert one.keys() == replay.keys() and all(torch.equal(one[k], replay[k]) for k in one)
    B = sum(len(b) for b in make_shards(run._lengths_groups(random_sequences(SEQS, seed=2)), 2, 48, 1).batches)
    streams = 2 if method == "gptaq" else 1
    # layer 0 stops each batch's model forward at its input (B) and runs once to group its modules; then each of
    # the two layers runs once per micro-batch and stream, where re-running per group costs a forward per group
    assert n_one == B + 1 + 2 * B * streams < n_replay


def test_an_error_midway_leaves_no_paused_forward(monkeypatch):
    monkeypatch.setattr(run, "ONE_PASS", True)
    model = tiny_model("llama")
    before = model.state_dict()

    def fail(name, H, r):
        if name.endswith("o_proj"):
            raise KeyboardInterrupt  # a user's Ctrl-C while the layer's forwards wait at o_proj

    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, random_sequences(SEQS, seed=2), 4, 16, progress=False, log=None, callback=fail)
    assert not [t for t in threading.enumerate() if t.name == "maca-layer-forward"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model as it was


@pytest.mark.parametrize("why", ["memory", "count"])
def test_replay_when_paused_forwards_would_not_fit(why, monkeypatch):
    """Too little free memory for what paused forwards hold, or more micro-batches than MAX_PAUSED: the layer is
    re-run per group instead, with the same bits."""
    made = []
    monkeypatch.setattr(run, "Stages", lambda *a, **k: made.append(1) or run.Replay(a[0], a[1], a[3], a[4]))
    if why == "memory":
        monkeypatch.setattr(run, "free_bytes", lambda device: 1 << 10)
    else:
        monkeypatch.setattr(run, "MAX_PAUSED", 2)
    low, _ = quantized(tiny_model("llama"), monkeypatch, True)
    assert not made
    monkeypatch.undo()
    full, _ = quantized(tiny_model("llama"), monkeypatch, True)
    assert all(torch.equal(low[k], full[k]) for k in low)
