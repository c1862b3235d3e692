"""Scales the GPTQ checkpoint's fp16 cannot hold (it rounds them to 0, below half its smallest subnormal 2⁻²⁴,
or past its max 65504) are refused with the layer's name, on every backend and in RTN; the edges themselves and
subnormal scales are stored exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import INTERPRETING

import maca_kernels as mk

CUDA = torch.cuda.is_available()  # the Triton sweep on the GPU, else under the interpreter on CPU tensors
TRITON = pytest.param("gptq", "triton", marks=pytest.mark.skipif(not (CUDA or INTERPRETING), reason="no Triton"))
METHODS = [("gptq", "reference"), ("gptq", "cpp"), ("rtn", None), TRITON]
N, K, G = 8, 64, 32


def problem(scale: float, seed: int):
    """Random W whose every (row, group) has the symmetric 4-bit scale ``scale`` exactly (max |w| = 7.5·scale), and
    a diagonal H (no error feedback: every backend's own quantizer sees W as it is)."""
    g = torch.Generator().manual_seed(seed)
    a = 7.5 * scale
    W = (torch.rand(N, K, generator=g) * 2 - 1) * (0.99 * a)
    W.view(N, K // G, G)[:, :, 0] = a
    return W, torch.diag(torch.rand(K, generator=g) + 0.5)


def quantize(method, W, H, backend, name):
    if method == "rtn":
        return mk.rtn_quantize(W, 4, G, sym=True, name=name)
    if backend == "triton" and CUDA:
        W, H = W.cuda(), H.cuda()
    return mk.gptq_quantize(W, H, bits=4, group_size=G, sym=True, backend=backend, name=name)


@pytest.mark.parametrize("method, backend", METHODS)
@pytest.mark.parametrize("inside, outside", [(2.0**-24, 2.0**-25), (3 * 2.0**-20, 2.0**-25), (65504.0, 65520.0)],
                         ids=["smallest-subnormal", "subnormal", "max"])
def test_scale_edges(method, backend, inside, outside):
    W, H = problem(inside, seed=1)
    q = quantize(method, W, H, backend, "model.layers.0.mlp.up_proj")
    assert torch.equal(q.scales, torch.full_like(q.scales, inside))  # the scale itself, not a rounded one
    ck = q.to_gptq()
    assert torch.equal(mk.dequantize_gptq(ck["qweight"], ck["scales"], ck["qzeros"], ck["g_idx"], 4), q.weight)
    W, H = problem(outside, seed=2)
    with pytest.raises(ValueError, match="layer model.layers.0.mlp.up_proj: row 0, group 0 needs a scale .* fp16"):
        quantize(method, W, H, backend, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("factor, match", [(1e-9, "below fp16's smallest subnormal"), (1e30, "above fp16's max")])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_issue_examples_are_refused(method, factor, match):
    g = torch.Generator().manual_seed(3)
    W, H = torch.randn(N, K, generator=g) * factor, torch.eye(K) + 0.1
    with pytest.raises(ValueError, match=f"layer q_proj: .*{match}.*rescale"):
        quantize(method, W, H, None, "q_proj")


def test_all_zero_groups_still_quantize():
    """An all-zero group gets the range [-1, 1] (scale 2/maxq), as before: never refused."""
    W, H = problem(0.01, seed=4)
    W[:, :G] = 0
    W[0] = 0
    for q in (mk.gptq_quantize(W, H, bits=4, group_size=G), mk.rtn_quantize(W, 4, G)):
        assert torch.all(q.weight[0] == 0) and torch.all(q.weight[:, :G] == 0)
