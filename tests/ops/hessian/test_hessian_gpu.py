"""Tier 3: the Triton kernel at real sizes on a GPU against float64 / fp32 references."""

from __future__ import annotations

import pytest
import torch
from helpers import gram64, needs_gpu, rel_err

import maca_kernels as mk
from maca_kernels.ops.hessian.reference import weighted_gram_reference

pytestmark = [pytest.mark.gpu, needs_gpu]


def maca_lengths(total: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([128, 512, 1024, 2048])
    n = choices[torch.randint(0, 4, (4 * total // 128,), generator=g)]
    n = n[torch.cumsum(n, 0) <= total]
    return torch.cat([n, torch.tensor([total - int(n.sum())])]) if int(n.sum()) < total else n


def _gram64_gpu(x, lengths, weighting="sequence"):
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    start = 0
    for n in lengths.tolist():
        xs = x[start : start + n].double()
        out += (1.0 / n if weighting == "sequence" else 1.0) * (xs.T @ xs)
        start += n
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_real_size_vs_float64(dtype, weighting):
    T, d = 256 * 1024, 4096
    if dtype == torch.float32:
        T = 32 * 1024  # fp32 runs on FMA units; keep the tier quick
    lengths = maca_lengths(T, seed=1)
    x = torch.randn(T, d, device="cuda").to(dtype)
    H = mk.accumulate_hessian(x, lengths, weighting=weighting)
    want = _gram64_gpu(x, lengths, weighting)
    err = rel_err(H, want)
    ref_err = rel_err(weighted_gram_reference(x, lengths, weighting), want)  # fp32 matmul of upcast input
    assert err <= max(1e-5, 1.5 * ref_err), (err, ref_err)
    assert torch.equal(H, H.T)
    # Tensor cores truncate when accumulating: without promotion the positive diagonal drifts low
    # (~3e-4 at this size). The promoted accumulator must keep the mean signed error at fp32 level.
    diag_bias = ((H.diagonal().double() - want.diagonal()) / want.diagonal()).mean().item()
    assert abs(diag_bias) <= 5e-7, diag_bias


def test_deterministic_and_split_agree():
    T, d = 64 * 1024, 1024
    lengths = maca_lengths(T, seed=2)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    a = mk.accumulate_hessian(x, lengths, deterministic=True)
    b = mk.accumulate_hessian(x, lengths, deterministic=True)
    assert torch.equal(a, b)
    c = mk.accumulate_hessian(x, lengths)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_cross_term_and_padded_on_gpu():
    B, L, d = 8, 1000, 768
    x = torch.randn(B, L, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([1000, 1, 999, 512, 128, 7, 300, 640])
    x_fp = (x.float() + 0.01 * torch.randn_like(x, dtype=torch.float32)).to(torch.bfloat16)
    acc = mk.HessianAccumulator(d, cross_term=True)
    acc.add(x, lengths, x_fp=x_fp)
    packed = torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])
    packed_fp = torch.cat([x_fp[b, :n] for b, n in enumerate(lengths.tolist())])
    assert rel_err(acc.H, gram64(packed, lengths)) <= 1e-5
    assert rel_err(acc.dXXt, gram64(packed, lengths, x_fp=packed_fp)) <= 1e-5


@pytest.mark.parametrize("d", [4100, 777])
def test_odd_hidden_size(d):
    """d not a multiple of any tile: edge tiles on both sides, symmetrize edges, masked loads."""
    T = 16 * 1024
    lengths = maca_lengths(T, seed=3)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    H = mk.accumulate_hessian(x, lengths)
    want = _gram64_gpu(x, lengths)
    assert rel_err(H, want) <= 1e-5
    assert torch.equal(H, H.T)


def test_repeated_calls_reuse_a_clean_scratch():
    """The cached scratch is reset by the symmetrize pass: the second call must not see the first's sums."""
    d = 1000
    for seed in (4, 5, 6):
        lengths = maca_lengths(8192, seed=seed)
        x = torch.randn(8192, d, device="cuda", dtype=torch.float16)
        out = torch.randn(d, d, device="cuda")
        start = out.clone()
        mk.accumulate_hessian(x, lengths, out=out)
        assert rel_err(out - start, _gram64_gpu(x, lengths)) <= 1e-5


def test_accumulator_add_never_syncs_and_defers_the_nan_check():
    d, T = 4096, 16 * 1024
    lengths = maca_lengths(T, seed=7).tolist()
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    acc = mk.HessianAccumulator(d, device="cuda")
    acc.add(x, lengths)  # first call: autotuning may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            acc.add(x, lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = 4 * _gram64_gpu(x, torch.tensor(lengths))
    assert rel_err(acc.H, want) <= 1e-5 and torch.equal(acc.H, acc.H.T)
    x[5, 7] = float("nan")
    acc.add(x, lengths)  # no error yet: the flag stays on the device
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.finalize()
