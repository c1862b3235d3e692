"""Scales the GPTQ checkpoint's fp16 cannot hold (past its max 65504, or a layer without one normal scale, ≥ 2⁻¹⁴)
are refused with the layer's name, on every backend and in RTN; the edges themselves are exact, and a nearly dead
group in a normal layer is kept (its scale clamped to 2⁻²⁴, as before)."""

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
@pytest.mark.parametrize("inside, outside", [(2.0**-14, 2.0**-14 - 2.0**-24), (65504.0, 65520.0)],
                         ids=["smallest-normal", "max"])
def test_scale_edges(method, backend, inside, outside):
    W, H = problem(inside, seed=1)
    q = quantize(method, W, H, backend, "model.layers.0.mlp.up_proj")
    assert torch.equal(q.scales, torch.full_like(q.scales, inside))  # the scale itself, not a rounded one
    ck = q.to_gptq()
    assert torch.equal(mk.dequantize_gptq(ck["qweight"], ck["scales"], ck["qzeros"], ck["g_idx"], 4), q.weight)
    W, H = problem(outside, seed=2)
    with pytest.raises(ValueError, match="layer model.layers.0.mlp.up_proj: .* fp16's (max|smallest normal)"):
        quantize(method, W, H, backend, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("factor, match", [(1e-9, "below fp16's smallest normal"), (1e30, "above fp16's max")])
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


@pytest.mark.parametrize("method, backend", METHODS)
def test_nearly_dead_group_in_a_normal_layer_is_kept(method, backend):
    """One group of 1e-6-sized weights at 8 bits needs a scale below 2⁻²⁴: clamped there (error ≤ 2⁻²⁵), not refused."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(N, K, generator=g) * 0.02
    W[5, :G] = torch.randn(G, generator=g) * 1e-6
    H = torch.eye(K)
    if method == "rtn":
        q = mk.rtn_quantize(W, 8, G, name="fc")
    else:
        Wd, Hd = (W.cuda(), H.cuda()) if backend == "triton" and CUDA else (W, H)
        q = mk.gptq_quantize(Wd, Hd, bits=8, group_size=G, backend=backend, name="fc")
    assert float(q.scales[5, 0]) == 2.0**-24
    assert (q.weight[5, :G].cpu() - W[5, :G]).abs().max() <= 2.0**-25
    assert (q.weight.cpu() - W).abs().max() <= q.scales.max() / 2 + 1e-9
