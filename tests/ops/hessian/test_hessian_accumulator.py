"""HessianAccumulator: counts, finalize convention, merge, GPTAQ cross term, all_reduce over gloo."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import gram64, needs_interpreter, ragged_lengths, randn, rel_err

import maca_kernels as mk

TOL = 1e-5
BACKENDS = ["cpp", pytest.param("triton", marks=needs_interpreter), "reference"]


def _batches(d=24, n_batches=3, seed=0):
    out = []
    for i in range(n_batches):
        lengths = ragged_lengths(seed + i, count=5, max_len=40)
        out.append((randn(int(lengths.sum()), d, dtype=torch.bfloat16, seed=seed + 10 + i), lengths))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_counts_and_finalize(backend, weighting):
    acc = mk.HessianAccumulator(24, weighting=weighting, backend=backend)
    want = torch.zeros(24, 24, dtype=torch.float64)
    n_seq = n_tok = 0
    for x, lengths in _batches():
        acc.add(x, lengths)
        want += gram64(x, lengths, weighting)
        n_seq += lengths.numel()
        n_tok += int(lengths.sum())
    assert (acc.n_sequences, acc.n_tokens) == (n_seq, n_tok)
    n = n_seq if weighting == "sequence" else n_tok
    assert rel_err(acc.finalize(), 2.0 / n * want) <= TOL
    assert rel_err(acc.H, want) <= TOL, "finalize must not modify the running sum"


def test_padded_batches_count_rows_as_sequences():
    acc = mk.HessianAccumulator(6)
    x = randn(3, 9, 6, seed=1)
    acc.add(x, attention_mask=torch.ones(3, 9, dtype=torch.bool))
    acc.add(x[:, :4], [4, 2, 1])
    assert (acc.n_sequences, acc.n_tokens) == (6, 27 + 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_equals_single_pass(backend):
    batches = _batches(seed=20, n_batches=4)
    whole = mk.HessianAccumulator(24, backend=backend, cross_term=True)
    parts = [mk.HessianAccumulator(24, backend=backend, cross_term=True) for _ in range(2)]
    for i, (x, lengths) in enumerate(batches):
        x_fp = x.float() + 0.05 * randn(*x.shape, seed=100 + i)
        x_fp = x_fp.to(x.dtype)
        whole.add(x, lengths, x_fp=x_fp)
        parts[i % 2].add(x, lengths, x_fp=x_fp)
    merged = parts[0].merge(parts[1])
    assert (merged.n_sequences, merged.n_tokens) == (whole.n_sequences, whole.n_tokens)
    torch.testing.assert_close(merged.finalize(), whole.finalize(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.finalize_cross(), whole.finalize_cross(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_term_matches_float64(backend, dtype):
    """GPTAQ: Σ_s w_s (X_fp − X)_sᵀ X_s, with the difference formed in fp32 (not rounded to bf16)."""
    lengths = ragged_lengths(seed=30)
    x = randn(int(lengths.sum()), 37, dtype=dtype, seed=31)
    x_fp = (x.float() + 0.01 * randn(*x.shape, seed=32)).to(dtype)
    acc = mk.HessianAccumulator(37, cross_term=True, backend=backend)
    acc.add(x, lengths, x_fp=x_fp)
    assert rel_err(acc.dXXt, gram64(x, lengths, x_fp=x_fp)) <= TOL
    assert rel_err(acc.H, gram64(x, lengths)) <= TOL
    n = lengths.numel()
    assert rel_err(acc.finalize_cross(), 2.0 / n * gram64(x, lengths, x_fp=x_fp)) <= TOL


def test_misuse_is_reported():
    acc = mk.HessianAccumulator(8)
    with pytest.raises(RuntimeError, match="empty HessianAccumulator"):
        acc.finalize()
    with pytest.raises(ValueError, match="cross_term=False"):
        acc.add(randn(4, 8), [4], x_fp=randn(4, 8))
    with pytest.raises(ValueError, match=r"out must be a float32 \[d, d\] = \[9, 9\]"):
        acc.add(randn(4, 9), [4])
    with pytest.raises(RuntimeError, match="cross_term=False"):
        acc.finalize_cross()
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(mk.HessianAccumulator(8, weighting="token"))
    with pytest.raises(ValueError, match="d must be a positive int"):
        mk.HessianAccumulator(0)
    cross = mk.HessianAccumulator(8, cross_term=True)
    with pytest.raises(ValueError, match="pass x_fp"):
        cross.add(randn(4, 8), [4])
    with pytest.raises(ValueError, match="x_fp must match x"):
        cross.add(randn(4, 8), [4], x_fp=randn(5, 8))


def _rank_main(rank: int, world: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        acc = mk.HessianAccumulator(24, cross_term=True)
        for i, (x, lengths) in enumerate(_batches(seed=40, n_batches=4)):
            if i % world == rank:
                acc.add(x, lengths, x_fp=(x.float() * 1.01).to(x.dtype))
        acc.all_reduce()
        results[rank] = (acc.H.clone(), acc.dXXt.clone(), acc.n_sequences, acc.n_tokens)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_two_gloo_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(2, port, results), nprocs=2, join=True)
    single = mk.HessianAccumulator(24, cross_term=True)
    for x, lengths in _batches(seed=40, n_batches=4):
        single.add(x, lengths, x_fp=(x.float() * 1.01).to(x.dtype))
    for rank in (0, 1):
        H, dXXt, n_seq, n_tok = results[rank]
        assert (n_seq, n_tok) == (single.n_sequences, single.n_tokens)
        torch.testing.assert_close(H, single.H, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dXXt, single.dXXt, rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_cross_term_split_is_fp32_accurate(seed):
    """bf16 inputs take the tensor-core cross term (x_fp − x split into three bf16 parts, three exact
    products): its error vs float64 stays at the level of an fp32 matmul of the same difference."""
    T, d = 8192, 96
    lengths = torch.tensor([T // 4] * 4)
    x = randn(T, d, dtype=torch.bfloat16, seed=seed)
    x_fp = (x.float() + 0.05 * randn(T, d, seed=seed + 10)).to(torch.bfloat16)
    want = gram64(x, lengths, x_fp=x_fp)
    acc = mk.HessianAccumulator(d, cross_term=True, backend="triton")
    acc.add(x, lengths, x_fp=x_fp)
    dx, xf = x_fp.float() - x.float(), x.float()
    fp32 = sum(dx[s : s + T // 4].T @ xf[s : s + T // 4] / (T // 4) for s in range(0, T, T // 4))
    assert rel_err(acc.dXXt, want) <= 1.5 * rel_err(fp32, want)
