"""Tier 3: quant_matmul on a GPU at real sizes, every schedule, CUDA graphs and torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import needs_gpu
from qmm_helpers import (
    CUDA_GEMV_CASES,
    CUDA_GEMV_K,
    CUDA_GEMV_N,
    MMA_TRITON_RUNS,
    cuda_gemv_checkpoint,
    random_checkpoint,
)

import maca_kernels as mk

pytestmark = [pytest.mark.gpu, needs_gpu]


# fp16 output rounding is ~2⁻¹¹ relative per element (~3e-4 rms), bf16 ~2⁻⁸: an off-by-one zero at 8 bits
# (~1e-2) fails these bounds
TOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


def rel(y, want):
    return ((y.double() - want).norm() / want.norm()).item()


@functools.lru_cache(maxsize=16)  # built on the CPU once per (K, N, bits), not once per (M, dtype)
def _checkpoint_on_gpu(K, N, bits):
    W, qw, sc, qz, _ = random_checkpoint(N, K, bits, 128, False, seed=K + N + bits)
    return W.cuda(), qw.cuda(), sc.cuda(), qz.cuda()


@pytest.mark.parametrize("K, N", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 16, 128, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_real_sizes_vs_float64(K, N, bits, M, dtype):
    W, qw, sc, qz = _checkpoint_on_gpu(K, N, bits)
    x = torch.randn(M, K, device="cuda").to(dtype)
    y = mk.quant_matmul(x, qw, sc, qz, None, bits, 128)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, x.double() @ W.T) <= TOL[dtype]


@pytest.mark.parametrize("group_size", [16, 32, 48, 64, -1])
@pytest.mark.parametrize("M", [1, 7, 65, 300])  # ragged M on every schedule
@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_groups_and_ragged_m(group_size, M, bits, deterministic):
    K, N = 1536, 1024
    W, qw, sc, qz, _ = random_checkpoint(N, K, bits, group_size, False, seed=M + bits)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    y = mk.quant_matmul(x, qw.cuda(), sc.cuda(), qz.cuda(), None, bits, group_size, deterministic=deterministic)
    assert rel(y, x.double() @ W.cuda().T) <= TOL[torch.float16]
    if deterministic:
        y2 = mk.quant_matmul(x, qw.cuda(), sc.cuda(), qz.cuda(), None, bits, group_size, deterministic=True)
        assert torch.equal(y, y2)


def test_strided_x_on_gpu():
    W, qw, sc, qz, _ = random_checkpoint(512, 1024, 4, 128, False, seed=3)
    base = torch.randn(5, 2048, device="cuda", dtype=torch.float16)
    for x in (base[:, ::2], base[:1, ::2], base[:, 1:1025]):
        y = mk.quant_matmul(x, qw.cuda(), sc.cuda(), qz.cuda(), None, 4, 128)
        assert rel(y, x.double() @ W.cuda().T) <= TOL[torch.float16]


def test_capture_before_any_eager_call_does_not_autotune():
    """A shape first seen inside a CUDA graph capture runs an untuned config instead of benchmarking."""
    W, qw, sc, qz, _ = random_checkpoint(1536, 768, 4, 128, False, seed=4)
    qw, sc, qz = qw.cuda(), sc.cuda(), qz.cuda()
    x = torch.randn(3, 768, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mk.quant_matmul(x, qw, sc, qz, None, 4, 128)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(captured, x.double() @ W.cuda().T) <= TOL[torch.float16]


@pytest.mark.parametrize("M", [1, 16, 300])
def test_act_order_on_gpu(M):
    W, qw, sc, qz, g_idx = random_checkpoint(512, 1024, 3, 128, True, seed=M)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.float16)
    y = mk.quant_matmul(x, qw.cuda(), sc.cuda(), qz.cuda(), g_idx.cuda(), 3, 128)
    assert rel(y, x.double() @ W.cuda().T) <= TOL[torch.float16]
    # the decode layout, converted on the GPU: the sorted kernels on x gathered once
    d = mk.to_decode_weight(qw.cuda(), sc.cuda(), qz.cuda(), g_idx.cuda(), 3, 128)
    assert d.perm is not None and d.g_idx is None
    assert torch.equal(d.to_checkpoint()["qweight"].cpu(), qw)
    assert rel(d.matmul(x), x.double() @ W.cuda().T) <= TOL[torch.float16]


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


# The CUDA tensor-core GEMV on the mma layout (opt-in backend="cuda" until this tier has passed on a GPU).
# One test per (bits, group): its fp16 / bf16, M <= 8 / _m16 kernels compile at first use (~1 s each).
@pytest.mark.parametrize("bits,group_size", CUDA_GEMV_CASES)
def test_cuda_gemv_matches_float64(bits, group_size):
    K, N = CUDA_GEMV_K, CUDA_GEMV_N  # shapes and cases shared with the emulator's CPU twin (qmm_helpers)
    for act_order in (False, True):
        W, qw, sc, qz, g_idx = cuda_gemv_checkpoint(bits, group_size, act_order)
        d = mk.to_decode_weight(qw.cuda(), sc.cuda(), qz.cuda(), None if g_idx is None else g_idx.cuda(), bits,
                                group_size, mma=True)
        for dtype in (torch.float16, torch.bfloat16):
            for M in (1, 5, 8, 9, 16):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                y = d.matmul(x, backend="cuda")
                assert y.dtype == dtype and y.shape == (M, N)
                assert rel(y, x.double() @ W.cuda().T) <= TOL[dtype], (bits, group_size, act_order, dtype, M)
                # all of K in one warp: refills, then K ends inside a trip (the loads past it hit the spares)
                once = d.matmul(x, backend="cuda", deterministic=True)
                assert rel(once, x.double() @ W.cuda().T) <= TOL[dtype], (bits, group_size, act_order, dtype, M)


@pytest.mark.parametrize("bits,group_size,dtype,M", MMA_TRITON_RUNS)
def test_triton_on_the_mma_layout_matches_float64(bits, group_size, dtype, M):
    """The Triton schedules on the mma layout: what a QuantLinear with the CUDA GEMV on runs above 16 rows
    (and the GEMV schedule, for x the CUDA kernel does not take). Cases shared with the CPU twin."""
    from maca_kernels.ops.quant_matmul.triton_kernel import launch_mma_matmul

    K, N = CUDA_GEMV_K, CUDA_GEMV_N
    for act_order in (False, True):
        W, qw, sc, qz, g_idx = cuda_gemv_checkpoint(bits, group_size, act_order)
        d = mk.to_decode_weight(qw.cuda(), sc.cuda(), qz.cuda(), None if g_idx is None else g_idx.cuda(), bits,
                                group_size, mma=True)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        want = x.double() @ W.cuda().T
        y = launch_mma_matmul(x, d.mma) if M == 1 else d.matmul(x, backend="cuda")
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel(y, want) <= TOL[dtype], (bits, group_size, act_order, dtype, M)
        if M > 64:  # the large-M schedule never splits K: deterministic is the same compile
            assert torch.equal(launch_mma_matmul(x, d.mma, deterministic=True), y)


def test_cuda_gemv_real_size_and_cuda_graph():
    W, qw, sc, qz = _checkpoint_on_gpu(4096, 4096, 4)
    d = mk.to_decode_weight(qw, sc, qz, None, 4, 128, mma=True)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    eager = d.matmul(x, backend="cuda")  # compiles (NVRTC) outside the capture
    assert rel(eager, x.double() @ W.T) <= TOL[torch.float16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = d.matmul(x, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    # the warps' sums over their ranges of K are added in slice order: the same bits on every launch
    assert torch.equal(captured, eager) and torch.equal(d.matmul(x, backend="cuda"), eager)
    once = d.matmul(x, backend="cuda", deterministic=True)  # all of K in one warp per 16 columns
    assert torch.equal(once, d.matmul(x, backend="cuda", deterministic=True))
    assert rel(once, x.double() @ W.T) <= TOL[torch.float16]



def test_quant_linear_cuda_gemv():
    W, qw, sc, qz, g_idx = random_checkpoint(1120, 2048, 3, 128, True, seed=21)
    layer = mk.QuantLinear.from_checkpoint({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}, 3, 128)
    layer = layer.cuda().enable_cuda_gemv()
    assert layer.qweight.numel() == 0  # one packed copy on the GPU: the layout's
    for M in (1, 4, 12, 17, 130):  # above 16 rows: the Triton kernels on the same layout
        x = torch.randn(M, 2048, device="cuda", dtype=torch.float16)
        assert rel(layer(x), x.double() @ W.cuda().T) <= TOL[torch.float16]


def test_enable_cuda_gemv_on_a_model():
    """mk.enable_cuda_gemv(model) on the GPU: switched layers (int4 g32 act-order, int3 g128) and the one it
    has no kernel for (8 bits) all match float64 at 1, 9 and 16 rows of bf16 x."""
    model, weights = torch.nn.ModuleDict(), {}
    for name, (bits, group, act) in {"a": (4, 32, True), "b": (3, 128, False), "c": (8, 128, False)}.items():
        W, qw, sc, qz, g_idx = random_checkpoint(160, 1024, bits, group, act, seed=50 + bits)
        tensors = {"qweight": qw, "scales": sc, "qzeros": qz} | ({"g_idx": g_idx} if act else {})
        model[name], weights[name] = mk.QuantLinear.from_checkpoint(tensors, bits, group), W.cuda()
    model = model.cuda()
    assert mk.enable_cuda_gemv(model) == ["a", "b"]
    for M in (1, 9, 16):
        x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
        for name, W in weights.items():
            assert rel(model[name](x), x.double() @ W.T) <= TOL[torch.bfloat16], (name, M)


def test_saving_act_order_layers_holds_one_permuted_copy_on_the_gpu():
    """state_dict() under checkpoint_qweights_on("cpu") (what save_quantized does): each act-order layer's
    checkpoint-order qweight leaves the GPU as it is built, so the GPU holds one layer's conversion at a time
    (96 small layers: their copies together outweigh one conversion's unpacked codes)."""
    from maca_kernels.nn.quant_linear import checkpoint_qweights_on

    W, qw, sc, qz, g_idx = random_checkpoint(256, 256, 4, 128, True, seed=60)
    tensors = {"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}
    model = torch.nn.ModuleDict({str(i): mk.QuantLinear.from_checkpoint(tensors, 4, 128) for i in range(96)}).cuda()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    one, _ = peak(lambda: model["0"].state_dict())  # one layer's conversion on the GPU

    def save_all():
        with checkpoint_qweights_on("cpu"):
            return model.state_dict()

    all_layers, sd = peak(save_all)
    assert all(sd[f"{i}.qweight"].device.type == "cpu" and torch.equal(sd[f"{i}.qweight"], qw) for i in range(96))
    assert all_layers <= 2 * one, (all_layers, one)
