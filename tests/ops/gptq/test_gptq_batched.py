"""``gptq_quantize_batched``: several weights of one shape, each with its own Hessian (a layer's experts), in one
Triton sweep launch per column block (the interpreter here, the GPU tier on a GPU): every result has the bits of
its own ``gptq_quantize``, for every mode the kernel has."""

from __future__ import annotations

import pytest
import torch
from gptq_helpers import correlated_problem
from helpers import needs_gpu

import maca_kernels as mk

FIELDS = ("codes", "scales", "zeros", "g_idx", "weight")


def problems(n: int, N: int, K: int, device="cpu"):
    out = [correlated_problem(N, K, seed=10 + i, device=device) for i in range(n)]
    out[1][1][:, 3] = out[1][1][3, :] = 0  # a dead column in one of them
    return out


def same(a, b):
    for k in FIELDS:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.loss == b.loss and a.damp == b.damp


@pytest.mark.parametrize("opts", [
    dict(),
    dict(act_order=True, static_groups=True),
    dict(act_order=True, gptaq=True),
    dict(group_size=-1, sym=True),
    dict(mse=True, bits=3),
], ids=["plain", "act-order static", "gptaq", "per-row sym", "mse 3-bit"])
def test_batched_gives_each_weight_its_own_bits(opts):
    opts = dict(opts)
    gptaq = opts.pop("gptaq", False)
    kw = dict(bits=opts.pop("bits", 4), group_size=opts.pop("group_size", 16), backend="triton", **opts)
    probs = problems(3, 40, 64)
    batched = mk.gptq_quantize_batched([W for W, _, _ in probs], [H for _, H, _ in probs],
                                       dxxts=[d for _, _, d in probs] if gptaq else None, **kw)
    for (W, H, d), got in zip(probs, batched, strict=True):
        same(mk.gptq_quantize(W, H, dxxt=d if gptaq else None, **kw), got)


def test_shared_factors_and_the_cpu_path():
    probs = problems(2, 24, 32)
    Ws, Hs = [W for W, _, _ in probs], [H for _, H, _ in probs]
    factors = [mk.gptq_factor(H, act_order=True) for H in Hs]
    for backend in ("triton", "cpp"):
        got = mk.gptq_quantize_batched(Ws, Hs, 4, 16, act_order=True, factors=factors, backend=backend)
        for W, H, r in zip(Ws, Hs, got, strict=True):
            same(mk.gptq_quantize(W, H, 4, 16, act_order=True, backend=backend), r)


def test_bad_batches_are_refused():
    (W, H, d), (W2, H2, _) = problems(2, 16, 32)
    with pytest.raises(ValueError, match=r"Hs must hold one entry per weight \(2\), got 1"):
        mk.gptq_quantize_batched([W, W2], [H], 4, 16)
    with pytest.raises(ValueError, match="Ws must be tensors of one shape on one device"):
        mk.gptq_quantize_batched([W, W2[:8]], [H, H2], 4, 16)
    with pytest.raises(ValueError, match="dxxts must be given for every weight or for none"):
        mk.gptq_quantize_batched([W, W2], [H, H2], 4, 16, dxxts=[d, None], backend="triton")
    with pytest.raises(ValueError, match=r"factor was made with act_order=True \(this call: False\)"):
        mk.gptq_quantize_batched([W, W2], [H, H2], 4, 16, factors=[mk.gptq_factor(H, act_order=True)] * 2,
                                 backend="triton")
    assert mk.gptq_quantize_batched([], [], 4, 16) == []


@pytest.mark.gpu
@needs_gpu
def test_experts_shaped_batch_on_the_gpu():
    """16 problems shaped like Qwen3-30B-A3B's gate projections (768 × 2048), batched vs one by one on the GPU."""
    probs = problems(16, 768, 2048, device="cuda")
    kw = dict(bits=4, group_size=128, act_order=True)
    batched = mk.gptq_quantize_batched([W for W, _, _ in probs], [H for _, H, _ in probs], **kw)
    for (W, H, _), got in zip(probs, batched, strict=True):
        same(mk.gptq_quantize(W, H, **kw), got)
