"""quant_matmul through the public API (CPU: C++ kernel) and the Triton kernels under the interpreter,
against float64 products from the codes; QuantLinear; torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_interpreter, randn
from qmm_helpers import random_checkpoint

import maca_kernels as mk
from maca_kernels._triton_utils import INTERPRETING

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}  # fp32 math; 16-bit output rounding
SCHEDULE_M = [1, 5, 67]  # GEMV, split-K tiles, GEMM tiles (SMALL_M_MAX = 64)


def rel(y, want):
    return ((y.double() - want).norm() / want.norm()).item()


@needs_interpreter
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 3, 16, 67])
@pytest.mark.parametrize("act_order", [False, True], ids=["sorted", "act_order"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_matches_float64(bits, M, act_order, dtype):
    N = 96 if bits == 3 else 80  # not a multiple of any tile width (qzeros packs along N, so N % (32/bits) == 0)
    W, qw, sc, qz, g_idx = random_checkpoint(N, 256, bits, 32, act_order, seed=bits * 100 + M)
    x = randn(M, 256, dtype=dtype, seed=M)
    y = mk.quant_matmul(x, qw, sc, qz, g_idx, bits, 32, backend="triton")
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, x.double() @ W.T) <= TOL[dtype]


@needs_interpreter
@pytest.mark.parametrize("group_size", [16, 32, 48, 64, 128, -1])
@pytest.mark.parametrize("M", SCHEDULE_M)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_every_group_size_on_every_schedule(group_size, M, deterministic):
    """Groups that no K-tile divides (16, 48) used to apply one group's scale to a tile spanning two."""
    K = 384 if group_size in (16, 32, 48, 64, -1) else 512
    fmt = "gptq_v2" if M == 5 else "gptq"
    W, qw, sc, qz, _ = random_checkpoint(64, K, 4, group_size, False, seed=group_size + M, convention=fmt)
    x = randn(M, K, dtype=torch.float16, seed=M)
    y = mk.quant_matmul(x, qw, sc, qz, None, 4, group_size, fmt, backend="triton", deterministic=deterministic)
    assert rel(y, x.double() @ W.T) <= TOL[torch.float16]
    if deterministic:
        again = mk.quant_matmul(x, qw, sc, qz, None, 4, group_size, fmt, backend="triton", deterministic=True)
        assert torch.equal(y, again)


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
@pytest.mark.parametrize("M", SCHEDULE_M)
def test_strided_x_every_backend(backend, M):
    """x with a last-dimension stride ≠ 1 (x[:, ::2]) used to be read as if contiguous on the Triton path."""
    if backend == "triton" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    W, qw, sc, qz, _ = random_checkpoint(64, 256, 8, 64, False, seed=M)
    x = randn(M, 512, dtype=torch.float16, seed=M)[:, ::2]
    assert x.stride(-1) == 2
    y = mk.quant_matmul(x, qw, sc, qz, None, 8, 64, backend=backend)
    assert rel(y, x.double() @ W.T) <= TOL[torch.float16]


@pytest.mark.parametrize("backend", ["cpp", "reference"] + (["triton"] if INTERPRETING else []))
def test_backends_agree_through_public_api(backend):
    W, qw, sc, qz, g_idx = random_checkpoint(96, 256, 3, 64, True, seed=21)
    x = randn(7, 256, dtype=torch.float16, seed=22)
    y = mk.quant_matmul(x, qw, sc, qz, g_idx, bits=3, group_size=64, backend=backend)
    assert y.dtype == torch.float16 and rel(y, x.double() @ W.T) <= TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_public_api_on_cpu_any_batch_shape(bits, dtype):
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, bits, 128, True, seed=bits)
    x = randn(2, 3, 256, dtype=dtype, seed=9)
    y = mk.quant_matmul(x, qw, sc, qz, g_idx, bits=bits, group_size=128)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    assert rel(y, x.double() @ W.T) <= TOL[dtype]


def test_quant_linear_from_gptq_and_state_dict():
    g = torch.Generator().manual_seed(10)
    X = torch.randn(512, 128, generator=g)
    W = torch.randn(64, 128, generator=g) * 0.05
    q = mk.gptq_quantize(W, X.T @ X / 512, bits=3, group_size=32, act_order=True)
    bias = torch.randn(64, generator=g).half()
    layer = mk.QuantLinear.from_gptq(q, bias=bias)
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    x = randn(4, 128, seed=11)
    want = x.double() @ q.weight.double().T + bias.double()
    assert rel(layer(x), want) <= 1e-5
    clone = mk.QuantLinear(128, 64, bits=3, group_size=32, bias=True)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x), layer(x))


def test_quant_linear_compiles_on_cpu():
    W, qw, sc, qz, _ = random_checkpoint(64, 128, 4, 32, False, seed=12)
    layer = mk.QuantLinear(128, 64, bits=4, group_size=32)
    layer.qweight.copy_(qw)
    layer.scales.copy_(sc)
    layer.qzeros.copy_(qz)
    compiled = torch.compile(layer, fullgraph=True)
    x = randn(3, 128, seed=13)
    torch.testing.assert_close(compiled(x), layer(x))
    assert rel(compiled(x), x.double() @ W.T) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=5), "bits must be one of"),
        (dict(bits=4.0), r"bits must be one of \(2, 3, 4, 8\), got 4.0"),
        (dict(checkpoint_format="awq"), "checkpoint_format must be one of"),
        (dict(group_size=48), "does not split K"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(backend="triton", x_dtype=torch.float32), "float16 or bfloat16 for backend='triton'"),
        (dict(qweight_rows=3), r"qweight must be \[K·bits/32, N\]"),
        (dict(x_k=100), "must be a multiple of 8"),
        (dict(g_idx=torch.zeros(5, dtype=torch.int32)), r"g_idx must be 1-D \[K\]"),
    ],
)
def test_bad_input(kwargs, match):
    W, qw, sc, qz, _ = random_checkpoint(64, 128, 4, 32, False, seed=14)
    if kwargs.get("backend") == "triton" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    x = randn(2, kwargs.pop("x_k", 128), dtype=kwargs.pop("x_dtype", torch.float32), seed=15)
    if "qweight_rows" in kwargs:
        qw = qw[: kwargs.pop("qweight_rows")].contiguous()
    args = dict(bits=4, group_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mk.quant_matmul(x, qw, sc, qz, args.pop("g_idx", None), **args)
