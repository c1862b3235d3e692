"""Every bad input of SPEC §6 gets a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch
from helpers import randn

import maca_kernels as mk


def x16(t=10, d=8, dtype=torch.float32):
    return randn(t, d, dtype=dtype, seed=0)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: mk.accumulate_hessian([[1.0]], [1]), TypeError, "x must be a torch.Tensor"),
        (lambda: mk.accumulate_hessian(x16().double(), [10]), TypeError, "float16, bfloat16 or float32"),
        (lambda: mk.accumulate_hessian(x16().int(), [10]), TypeError, "float16, bfloat16 or float32"),
        (lambda: mk.accumulate_hessian(torch.randn(10), [10]), ValueError, r"x must be packed \[T, d\]"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 3, 4, 5), [10]), ValueError, "x must be packed"),
        (lambda: mk.accumulate_hessian(torch.randn(10, 0), [10]), ValueError, "d = 0"),
        (lambda: mk.accumulate_hessian(x16(), [4, 5]), ValueError, "lengths sum to 9 but x has T = 10"),
        (lambda: mk.accumulate_hessian(x16(), [11, -1]), ValueError, r"lengths\[1\] = -1"),
        (lambda: mk.accumulate_hessian(x16(), [10, 0]), ValueError, r"lengths\[1\] = 0"),
        (lambda: mk.accumulate_hessian(x16(), []), ValueError, "lengths is empty"),
        (lambda: mk.accumulate_hessian(x16(), torch.tensor([5.0, 5.0])), TypeError, "integer tensor"),
        (lambda: mk.accumulate_hessian(x16(), torch.tensor([[5, 5]])), ValueError, "lengths must be 1-D"),
        (lambda: mk.accumulate_hessian(x16(), "10"), TypeError, "lengths must be"),
        (lambda: mk.accumulate_hessian(x16()), ValueError, "lengths is required"),
        (lambda: mk.accumulate_hessian(x16(), [10], weighting="mean"), ValueError, "weighting must be one of"),
        (lambda: mk.accumulate_hessian(x16(), [10], backend="cuda"), ValueError, "backend must be one of"),
        (lambda: mk.accumulate_hessian(x16(), [10], attention_mask=torch.ones(10)), ValueError, "attention_mask"),
        (lambda: mk.accumulate_hessian(x16(), [10], out=torch.zeros(8, 8, dtype=torch.float64)), ValueError,
         r"out must be a float32 \[d, d\]"),
        (lambda: mk.accumulate_hessian(x16(), [10], out=torch.zeros(8, 9)), ValueError, "out must be a float32"),
        (lambda: mk.accumulate_hessian(x16(), [10], out=torch.zeros(8, 16)[:, ::2]), ValueError, "unit stride"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), [5, 6]), ValueError, "exceeds the padded length L = 5"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), [5]), ValueError, "one entry per batch row"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), attention_mask=torch.ones(2, 4)), ValueError,
         r"shape \[B, L\] = \(2, 5\)"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), attention_mask=torch.full((2, 5), 2)), ValueError,
         "only 0 and 1"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), attention_mask=torch.full((2, 5), 0.5)), ValueError,
         "only 0 and 1"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), attention_mask=torch.tensor([[1] * 5, [0] * 5])),
         ValueError, "row 1 has no valid token"),
        (lambda: mk.accumulate_hessian(torch.randn(2, 5, 4), [5, 5], attention_mask=torch.ones(2, 5)), ValueError,
         "not both"),
    ],
)
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_activations(bad, dtype):
    x = x16(dtype=dtype)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        mk.accumulate_hessian(x, [10])
    H = mk.accumulate_hessian(x, [10], check_finite=False)  # opt-out: the user takes responsibility
    assert not torch.isfinite(H).all()


def test_non_finite_in_valid_part_of_padded_batch():
    x = torch.randn(2, 6, 4)
    x[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.accumulate_hessian(x, [6, 3])
    mk.accumulate_hessian(x, [6, 2])  # the NaN is padding now


def test_cpp_backend_rejects_cuda_and_triton_needs_interpreter_or_gpu(monkeypatch):
    from maca_kernels import _triton_utils
    from maca_kernels.ops.hessian import triton_kernel  # noqa: F401  (imported unpatched: its configs depend on it)

    monkeypatch.setattr(_triton_utils, "INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor"):
        mk.accumulate_hessian(x16(), [10], backend="triton")
