"""``gptq_factor``: one factorisation of H shared by the weights solved against it gives each solve the bits of its
own factorisation, for every option that reaches the factor; a factor made with other settings is refused."""

from __future__ import annotations

import pytest
import torch
from gptq_helpers import correlated_problem

import maca_kernels as mk

FIELDS = ("codes", "scales", "zeros", "g_idx", "weight")


@pytest.mark.parametrize("opts", [
    dict(),
    dict(act_order=True, static_groups=True),
    dict(act_order=True, gptaq=True, alpha=0.5),
    dict(reg=0.3, damp=0.05),
    dict(group_size=-1, sym=True),
], ids=["plain", "act-order static", "gptaq", "reg", "per-row sym"])
def test_a_shared_factor_gives_the_bits_of_separate_solves(opts):
    opts = dict(opts)
    W, H, dxxt = correlated_problem(48, 64, seed=3)
    W2 = torch.randn(24, 64, generator=torch.Generator().manual_seed(9))
    H[:, 5] = H[5, :] = 0  # a dead column
    gptaq = opts.pop("gptaq", False)
    group_size, sym, static = opts.pop("group_size", 16), opts.pop("sym", False), opts.pop("static_groups", False)
    kw = dict(opts, dxxt=dxxt if gptaq else None)
    f = mk.gptq_factor(H, **{k: v for k, v in kw.items()})
    for w, bits in ((W, 4), (W2, 3)):  # other weights, bits and row counts on one factor
        alone = mk.gptq_quantize(w, H, bits, group_size, sym, static_groups=static, **kw)
        shared = mk.gptq_quantize(w, H, bits, group_size, sym, static_groups=static, factor=f, **kw)
        for k in FIELDS:
            assert torch.equal(getattr(alone, k), getattr(shared, k)), k
        assert alone.loss == shared.loss and alone.damp == shared.damp


def test_a_factor_made_otherwise_is_refused():
    W, H, dxxt = correlated_problem(16, 32, seed=1)
    f = mk.gptq_factor(H, act_order=True)
    with pytest.raises(ValueError, match=r"factor was made with act_order=True \(this call: False\): pass "
                                         r"gptq_quantize the arguments gptq_factor had \(layer q\)"):
        mk.gptq_quantize(W, H, 4, 16, factor=f, name="q")
    with pytest.raises(ValueError, match=r"gptaq=False \(this call: True\)"):
        mk.gptq_quantize(W, H, 4, 16, act_order=True, dxxt=dxxt, factor=f)
    with pytest.raises(ValueError, match=r"factor is for K = 32 on cpu, W is \[N, 16\]"):
        mk.gptq_quantize(W[:, :16], H[:16, :16], 4, 16, act_order=True, factor=f)
    with pytest.raises(ValueError, match="factor must come from gptq_factor, got dict"):
        mk.gptq_quantize(W, H, 4, 16, factor={})
    with pytest.raises(ValueError, match=r"H must be a floating-point \[K, K\] tensor, got \(3,\)"):
        mk.gptq_factor(torch.ones(3))
    with pytest.raises(ValueError, match="H contains NaN"):
        mk.gptq_factor(torch.full((4, 4), float("nan")))
