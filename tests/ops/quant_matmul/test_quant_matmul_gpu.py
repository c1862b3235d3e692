"""Tier 3: quant_matmul on a GPU at real sizes, every schedule, CUDA graphs and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_gpu
from qmm_helpers import random_checkpoint

import maca_kernels as mk

pytestmark = [pytest.mark.gpu, needs_gpu]


def rel(y, want):
    return ((y.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("K, N", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 16, 128, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_real_sizes_vs_float64(K, N, bits, M, dtype):
    W, qw, sc, qz, _ = random_checkpoint(N, K, bits, 128, False, seed=K + N + bits)
    qw, sc, qz = qw.cuda(), sc.cuda(), qz.cuda()
    x = torch.randn(M, K, device="cuda").to(dtype)
    y = mk.quant_matmul(x, qw, sc, qz, None, bits, 128)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, x.double() @ W.cuda().T) <= 1e-2


@pytest.mark.parametrize("M", [1, 16, 300])
def test_act_order_on_gpu(M):
    W, qw, sc, qz, g_idx = random_checkpoint(512, 1024, 3, 128, True, seed=M)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.float16)
    y = mk.quant_matmul(x, qw.cuda(), sc.cuda(), qz.cuda(), g_idx.cuda(), 3, 128)
    assert rel(y, x.double() @ W.cuda().T) <= 1e-2


def test_cuda_graph_and_compile():
    W, qw, sc, qz, _ = random_checkpoint(1024, 1024, 4, 128, False, seed=1)
    layer = mk.QuantLinear(1024, 1024, bits=4, group_size=128).cuda()
    for name, t in (("qweight", qw), ("scales", sc), ("qzeros", qz)):
        getattr(layer, name).copy_(t)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    eager = layer(x)  # autotunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x)
    graph.replay()
    torch.testing.assert_close(captured, eager)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), eager)
