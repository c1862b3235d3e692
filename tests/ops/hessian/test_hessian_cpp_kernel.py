"""Direct tests of the C++ kernel ``maca_kernels._C.weighted_gram`` (csrc/hessian/weighted_gram.cpp).

Every case compares against a float64 reference ``Σ_r w_r A_rᵀ B_r`` built from the same (upcast) input
values. Buffer regions the kernel must neither read nor write are filled with NaN, so a stray read
poisons the result and a stray write shows up in the padding.
"""

from __future__ import annotations

import pytest
import torch

from maca_kernels import _C

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = list(DTYPE_CODE)
SIZES = [1, 5, 16, 65, 130, 257]
# 1-row runs, runs longer than a K-block (256) and nothing a multiple of any block size.
RAGGED = [1, 37, 300, 1, 2, 259, 611, 5, 1, 77]
TOL = 1e-5  # fp32 products and sums against float64


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def make_runs(lengths, gap: int = 0, weights: str = "inverse_length", seed: int = 0):
    """Runs laid out one after another with `gap` skipped rows between them; weight 1/len by default."""
    length = torch.tensor(lengths, dtype=torch.int64)
    start = torch.cumsum(length + gap, 0) - length - gap
    if weights == "inverse_length":
        weight = (1.0 / length.double()).float()
    else:  # random signs and magnitudes, so neighbouring runs of equal length still differ
        weight = torch.randn(len(lengths), generator=torch.Generator().manual_seed(seed + 99))
    n_rows = int(start[-1] + length[-1]) if len(lengths) else 0
    return (start, length, weight), n_rows


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gram(out, a, runs, *, a_sub=None, b=None, num_threads=0, **kwargs):
    """Calls the kernel on tensors: `out` is a [d, d] view, inputs are [rows, d] row-major views."""
    start, length, weight = runs
    _C.weighted_gram(
        out.data_ptr(),
        out.stride(0),
        a.shape[1],
        a.data_ptr(),
        0 if a_sub is None else a_sub.data_ptr(),
        0 if b is None else b.data_ptr(),
        DTYPE_CODE[a.dtype],
        a.stride(0),
        start.data_ptr(),
        length.data_ptr(),
        weight.data_ptr(),
        start.numel(),
        num_threads,
        **kwargs,
    )


def reference(a, runs, *, a_sub=None, b=None):
    """float64 Σ_r w_r A_rᵀ B_r from the upcast inputs."""
    A = a.double() if a_sub is None else a.double() - a_sub.double()
    B = A if b is None else b.double()
    out = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64)
    for s, n, w in zip(*(t.tolist() for t in runs), strict=True):
        out += w * (A[s : s + n].T @ B[s : s + n])
    return out


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def inputs(mode, rows, d, dtype, seed):
    """(a, a_sub, b) for mode 'sym' (B = A), 'b' (B given) or 'sub' (A = a - a_sub, B given)."""
    a = randn(rows, d, dtype=dtype, seed=seed)
    b = randn(rows, d, dtype=dtype, seed=seed + 1) if mode in ("b", "sub") else None
    a_sub = randn(rows, d, dtype=dtype, seed=seed + 2) if mode == "sub" else None
    return a, a_sub, b


def nan_padded_rows(x, extra_cols):
    """Copy of x inside a NaN buffer: `extra_cols` NaN columns per row; returns the [rows, d] view."""
    rows, d = x.shape
    wide = torch.full((rows, d + extra_cols), float("nan"), dtype=x.dtype)
    wide[:, :d] = x
    return wide[:, :d]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sym", "b", "sub"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d", SIZES, ids=lambda d: f"d{d}")
def test_matches_float64(d, dtype, mode):
    runs, rows = make_runs(RAGGED)
    a, a_sub, b = inputs(mode, rows, d, dtype, seed=d)
    out = torch.zeros(d, d)
    gram(out, a, runs, a_sub=a_sub, b=b)
    assert rel_err(out, reference(a, runs, a_sub=a_sub, b=b)) <= TOL
    if mode == "sym":
        assert torch.equal(out, out.T), "the mirrored half must equal the computed half"


@pytest.mark.parametrize("mode", ["sym", "b", "sub"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_strided_rows_and_skipped_rows_are_never_read(dtype, mode):
    """Rows are a slice of a wider buffer (row_stride > d) and runs skip NaN padding rows."""
    d, gap = 65, 3
    runs, rows = make_runs(RAGGED, gap=gap, weights="random")
    a, a_sub, b = inputs(mode, rows, d, dtype, seed=11)
    in_run = torch.zeros(rows, dtype=torch.bool)
    for s, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
        in_run[s : s + n] = True
    for t in (a, a_sub, b):
        if t is not None:
            t[~in_run] = float("nan")
    views = [None if t is None else nan_padded_rows(t, extra_cols=19) for t in (a, a_sub, b)]
    assert views[0].stride(0) == d + 19
    out = torch.zeros(d, d)
    gram(out, views[0], runs, a_sub=views[1], b=views[2])
    assert torch.isfinite(out).all()
    want = reference(
        torch.nan_to_num(a),
        runs,
        a_sub=None if a_sub is None else torch.nan_to_num(a_sub),
        b=None if b is None else torch.nan_to_num(b),
    )
    assert rel_err(out, want) <= TOL


@pytest.mark.parametrize("mode", ["sym", "b"])
@pytest.mark.parametrize("d", [5, 130], ids=lambda d: f"d{d}")
def test_accumulates_into_prefilled_out_with_leading_dimension(d, mode):
    """out is a [d, d] view with ld_out > d over a NaN buffer, prefilled with a NON-symmetric matrix."""
    runs, rows = make_runs(RAGGED)
    a, _, b = inputs(mode, rows, d, torch.float32, seed=5)
    buf = torch.full((d, d + 9), float("nan"))
    out = buf[:, :d]
    prefill = randn(d, d, seed=6)
    out.copy_(prefill)
    gram(out, a, runs, b=b)
    assert torch.isnan(buf[:, d:]).all(), "padding columns past d were written"
    assert rel_err(out, prefill.double() + reference(a, runs, b=b)) <= TOL


@pytest.mark.parametrize("mode", ["sym", "sub"])
def test_thread_counts_agree(mode):
    d = 130
    runs, rows = make_runs(RAGGED, weights="random")
    a, a_sub, b = inputs(mode, rows, d, torch.bfloat16, seed=3)
    results = []
    for threads in (1, 2, 3, 0):
        out = torch.zeros(d, d)
        gram(out, a, runs, a_sub=a_sub, b=b, num_threads=threads)
        results.append(out)
    want = reference(a, runs, a_sub=a_sub, b=b)
    for out in results:
        assert rel_err(out, want) <= TOL
        torch.testing.assert_close(out, results[0], rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("mode", ["sym", "b"])
def test_column_stripes_under_a_small_scratch_budget(mode):
    """A tiny scratch budget forces many column stripes; the result must not change."""
    d = 257
    runs, rows = make_runs(RAGGED[:6])
    a, _, b = inputs(mode, rows, d, torch.float16, seed=8)
    full, striped = torch.zeros(d, d), torch.zeros(d, d)
    gram(full, a, runs, b=b)
    gram(striped, a, runs, b=b, scratch_budget_bytes=64 * 1024, num_threads=2)
    assert rel_err(striped, reference(a, runs, b=b)) <= TOL
    torch.testing.assert_close(striped, full, rtol=1e-6, atol=1e-6 * full.abs().max().item())


def test_many_tiny_runs_with_changing_weights():
    """Weights change every 1-3 rows: every token boundary may flush the register tile."""
    d = 37
    lengths = torch.randint(1, 4, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    runs, rows = make_runs(lengths, weights="random", seed=4)
    a = randn(rows, d, seed=4)
    out = torch.zeros(d, d)
    gram(out, a, runs)
    assert rel_err(out, reference(a, runs)) <= TOL


def test_row_offsets_beyond_32_bits():
    """row index * row_stride > 2^31 elements: address arithmetic must be 64-bit."""
    d, stride, last = 16, (1 << 20) + 3, 2100  # offset of the last row: ~2.2e9 elements
    try:
        buf = torch.empty(last * stride + d, dtype=torch.float16)  # virtual memory; 2 rows are touched
    except RuntimeError as exc:  # pragma: no cover - strict overcommit
        pytest.skip(f"cannot reserve a 4 GiB buffer: {exc}")
    x = buf.as_strided((last + 1, d), (stride, 1))
    x[0] = randn(d, dtype=torch.float16, seed=1)
    x[last] = randn(d, dtype=torch.float16, seed=2)
    runs = (torch.tensor([0, last]), torch.tensor([1, 1]), torch.tensor([1.0, 0.5]))
    out = torch.zeros(d, d)
    gram(out, x, runs)
    want = x[0].double().outer(x[0].double()) + 0.5 * x[last].double().outer(x[last].double())
    assert rel_err(out, want) <= TOL


def test_no_runs_leaves_out_untouched():
    out = randn(4, 4, seed=1)
    before = out.clone()
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    gram(out, randn(3, 4, seed=2), empty)
    assert torch.equal(out, before)


def test_rejects_arguments_that_would_be_unsafe():
    out, a = torch.zeros(4, 4), randn(3, 4)
    runs, _ = make_runs([3])
    with pytest.raises(ValueError, match="a_sub requires b"):
        gram(out, a, runs, a_sub=a)
    with pytest.raises(ValueError, match="dtype"):
        _C.weighted_gram(out.data_ptr(), 4, 4, a.data_ptr(), 0, 0, 7, 4, *(t.data_ptr() for t in runs), 1, 1)
    with pytest.raises(ValueError, match="run_len"):
        gram(out, a, (runs[0], torch.zeros(1, dtype=torch.int64), runs[2]))
