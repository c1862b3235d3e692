"""accumulate_hessian on the CPU: C++ kernel, Triton kernel (interpreter) and the PyTorch reference,
each against float64 ground truth on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, gram64, needs_interpreter, ragged_lengths, randn, rel_err

import maca_kernels as mk

BACKENDS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=needs_interpreter),
    pytest.param("reference", id="reference"),
]
TOL = 1e-5  # products of fp16/bf16 values are exact in fp32, so every dtype meets the fp32 bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("d", [1, 65, 130])
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_packed_matches_float64(backend, dtype, d, weighting):
    lengths = ragged_lengths(seed=d)
    x = randn(int(lengths.sum()), d, dtype=dtype, seed=d + 1)
    H = mk.accumulate_hessian(x, lengths, weighting=weighting, backend=backend)
    assert H.dtype == torch.float32 and H.shape == (d, d)
    assert rel_err(H, gram64(x, lengths, weighting)) <= TOL
    assert torch.equal(H, H.T), "the Hessian must come out exactly symmetric"


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_accumulates_in_place(backend):
    d, lengths = 70, ragged_lengths(seed=3)
    x = randn(int(lengths.sum()), d, dtype=torch.bfloat16, seed=4)
    prior = randn(d, d, seed=5)  # deliberately not symmetric: out += H must not assume it
    out = prior.clone()
    ret = mk.accumulate_hessian(x, lengths, out=out, backend=backend)
    assert ret is out
    assert rel_err(out, prior.double() + gram64(x, lengths)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_padded_rows(backend):
    """out may be a view into a wider buffer; the padding columns must stay untouched."""
    d, lengths = 40, ragged_lengths(seed=16)
    x = randn(int(lengths.sum()), d, dtype=torch.float16, seed=17)
    buf = torch.full((d, 2 * d + 3), float("nan"))
    out = buf[:, :d]
    out.zero_()
    mk.accumulate_hessian(x, lengths, out=out, backend=backend)
    assert rel_err(out, gram64(x, lengths)) <= TOL
    assert torch.isnan(buf[:, d:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_padded_forms_agree_with_packed(backend, weighting):
    B, L, d = 4, 45, 33
    x = randn(B, L, d, dtype=torch.float16, seed=6)
    lengths = torch.tensor([45, 1, 17, 30])
    x[1, 1:] = float("nan")  # padding is never read, even with check_finite
    x[3, 30:] = float("inf")
    packed = torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])
    want = gram64(packed, lengths, weighting)
    by_lengths = mk.accumulate_hessian(x, lengths, weighting=weighting, backend=backend)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    by_mask = mk.accumulate_hessian(x, attention_mask=mask.to(torch.int64), weighting=weighting, backend=backend)
    assert rel_err(by_lengths, want) <= TOL
    assert rel_err(by_mask, want) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_and_holes_in_mask(backend):
    B, L, d = 3, 40, 20
    x = randn(B, L, d, seed=7)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 10:] = True  # left padding
    mask[1, :5] = True  # right padding
    mask[1, 20:23] = True  # a hole: the row's valid tokens are still one sequence
    mask[2] = True
    x[~mask] = float("nan")
    lengths = mask.sum(1)
    want = gram64(x[mask], lengths)
    assert rel_err(mk.accumulate_hessian(x, attention_mask=mask, backend=backend), want) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    wide = randn(150, 96, seed=8)
    x = wide[:, 10:60]  # rows 96 apart, unit inner stride: read in place
    lengths = [1, 60, 89]
    assert rel_err(mk.accumulate_hessian(x, lengths, backend=backend), gram64(x, lengths)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_input_is_handled(backend):
    x = randn(40, 120, seed=9).T  # [120, 40] with unit stride along T, not d
    lengths = [20, 100]
    assert rel_err(mk.accumulate_hessian(x, lengths, backend=backend), gram64(x, lengths)) <= TOL


def test_sequence_weighting_is_mean_per_sequence():
    """MaCa: a sequence counts once whatever its length — duplicating its tokens changes nothing."""
    x = randn(30, 8, seed=10)
    twice = torch.cat([x, x])
    H1 = mk.accumulate_hessian(x, [30])
    H2 = mk.accumulate_hessian(twice, [60])
    torch.testing.assert_close(H1, H2, rtol=1e-6, atol=1e-6)
    Ht = mk.accumulate_hessian(twice, [60], weighting="token")
    torch.testing.assert_close(Ht, 60 * H2, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("split", [1, 3])
def test_triton_split_schedules(split):
    """Split-T programs must flush their partial weighted sums correctly at any chunk boundary."""
    from maca_kernels.ops.hessian.plan import make_plan
    from maca_kernels.ops.hessian.triton_kernel import launch_weighted_gram

    lengths = torch.tensor([33, 1, 64, 65, 7, 128, 2, 40])
    x = randn(int(lengths.sum()), 40, dtype=torch.float16, seed=11)
    plan = make_plan(x, lengths)
    out = torch.zeros(40, 40)
    launch_weighted_gram(out, plan.x, (plan.run_start, plan.run_len, plan.run_weight), split=split)
    assert rel_err(out, gram64(x, lengths)) <= TOL


@needs_interpreter
def test_chunk_table_sorted_by_weight_with_rescales():
    from maca_kernels.ops.hessian.triton_kernel import chunk_table

    start = torch.tensor([0, 10, 40])
    length = torch.tensor([10, 30, 5])
    weight = 1.0 / length.float()
    s, rows, w, rescale = chunk_table(start, length, weight, block_t=8)
    assert torch.all(w[1:] >= w[:-1])
    n = rows.abs()
    assert int(n.sum()) == 45 and int(n.max()) <= 8
    covered = sorted(r for a, k in zip(s.tolist(), n.tolist(), strict=True) for r in range(a, a + k))
    assert covered == list(range(45))
    change = rescale.nonzero().flatten()
    assert change.tolist() == [3, 5]  # last chunk of the 30-run (4 chunks) and of the 10-run (2 chunks)
    assert (rows < 0).nonzero().flatten().tolist() == [3, 5]
    torch.testing.assert_close(rescale[change], w[change] / w[change + 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_beyond_int32(backend):
    """Row offsets past 2**31 elements: only a few pages of a huge, lazily allocated buffer are touched."""
    if backend == "reference":
        pytest.skip("the reference indexes through torch, nothing to overflow")
    d = 16
    L = (1 << 31) // d + 64  # row L starts past 2**31 elements
    x = torch.empty(2, L, d, dtype=torch.bfloat16)
    x[0, :5] = randn(5, d, dtype=torch.bfloat16, seed=12)
    x[1, :7] = randn(7, d, dtype=torch.bfloat16, seed=13)
    H = mk.accumulate_hessian(x, torch.tensor([5, 7]), backend=backend)
    want = gram64(x[0, :5], [5]) + gram64(x[1, :7], [7])
    assert rel_err(H, want) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_sequences_mixed_lengths(backend):
    """A MaCa-style length mix (many distinct weights, shuffled) at a size the interpreter handles."""
    g = torch.Generator().manual_seed(14)
    lengths = torch.tensor([8, 32, 64, 128])[torch.randint(0, 4, (24,), generator=g)]
    lengths[5] = 3
    x = randn(int(lengths.sum()), 48, dtype=torch.bfloat16, seed=15)
    assert rel_err(mk.accumulate_hessian(x, lengths, backend=backend), gram64(x, lengths)) <= TOL


@needs_interpreter
def test_triton_scratch_is_reset_between_calls():
    """The symmetric Triton path keeps a cached scratch that its symmetrize pass resets while reading:
    each call must see only its own sums, and the accumulator's upper-only sums mirror correctly."""
    d = 70
    acc = mk.HessianAccumulator(d, backend="triton")
    total = torch.zeros(d, d, dtype=torch.float64)
    for seed in range(3):
        lengths = ragged_lengths(seed, count=5, max_len=60)
        x = randn(int(lengths.sum()), d, seed=seed)
        H = mk.accumulate_hessian(x, lengths, backend="triton")
        want = gram64(x, lengths)
        assert rel_err(H, want) <= 1e-5 and torch.equal(H, H.T)
        acc.add(x, lengths)
        total += want
    assert rel_err(acc.H, total) <= 1e-5 and torch.equal(acc.H, acc.H.T)


@pytest.mark.parametrize("n", [1, 5, 262])
def test_chunk_tables_are_16_byte_aligned_views_of_one_buffer(n):
    """One copy for the four tables, each 16-byte aligned (so the JIT's specialisation does not change
    with the chunk count), holding exactly the values of the separate tables."""
    from maca_kernels.ops.hessian.triton_kernel import _device_tables, table_offsets

    g = torch.Generator().manual_seed(n)
    tables = (torch.randint(0, 10**12, (n,), generator=g), torch.randint(-64, 64, (n,), generator=g).int(),
              torch.rand(n, generator=g), torch.rand(n, generator=g))
    out = _device_tables(tables, torch.device("cpu"))
    assert all(o % 16 == 0 for o in table_offsets(n))
    for got, want in zip(out, tables, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
