"""gptq_quantize with group parameters given by the caller (another tool's observer) and with a caller's
damping schedule: every backend against a float64 column-by-column GPTQ with the same fixed parameters."""

from __future__ import annotations

import pytest
import torch
from gptq_helpers import correlated_problem
from helpers import needs_interpreter

import maca_kernels as mk
from maca_kernels.ops.gptq import NotPositiveDefiniteError


def observer_params(W, bits, group_size, seed):
    """Scales/zeros as an outside observer might choose them: not fp16-representable, zeros that may be 0."""
    N, K = W.shape
    g = group_size if group_size > 0 else K
    Wg = W.reshape(N, K // g, g)
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    gen = torch.Generator().manual_seed(seed)
    scales = (hi - lo) / maxq * (1 + 0.01 * torch.rand(lo.shape, generator=gen))  # arbitrary fp32
    zeros = torch.round(-lo / scales).clamp(0, maxq)
    return scales, zeros


def gptq_float64(W, H, scales, zeros, bits, group_size, act_order, damp):
    """Column-by-column GPTQ in float64 with fixed parameters (groups of original columns)."""
    W = W.double().clone()
    H = H.double().clone()
    N, K = W.shape
    g = group_size if group_size > 0 else K
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(K)
    H = H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = W[:, perm]
    codes = torch.empty(N, K, dtype=torch.float64)
    maxq = 2**bits - 1
    for i in range(K):
        gi = int(perm[i]) // g
        s, z = scales[:, gi].double(), zeros[:, gi].double()
        q = torch.clamp(torch.round(W[:, i] / s) + z, 0, maxq)
        codes[:, i] = q
        err = (W[:, i] - (q - z) * s) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


CASES = [(4, 32, False), (4, 32, True), (3, -1, True), (2, 64, False), (8, 128, True)]


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("bits, group_size, act_order", CASES, ids=lambda v: str(v))
def test_given_params_match_float64(backend, bits, group_size, act_order):
    W, H, _ = correlated_problem(40, 256, seed=bits + group_size)
    scales, zeros = observer_params(W, bits, group_size, seed=1)
    r = mk.gptq_quantize(W, H, bits=bits, group_size=group_size, act_order=act_order, scales=scales,
                         zeros=zeros, backend=backend)
    assert torch.equal(r.scales, scales) and torch.equal(r.zeros, zeros.int()), "given parameters are kept as given"
    expect = gptq_float64(W, H, scales, zeros, bits, group_size, act_order, r.damp)
    # fp32 solve vs float64: a code may flip where a value sits on a rounding boundary, never more than 1
    diff = (r.codes.double() - expect).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    g = r.g_idx.long()
    assert torch.equal(g, torch.arange(256) // (group_size if group_size > 0 else 256))
    assert torch.equal(r.weight, (r.codes - r.zeros[:, g]).float() * r.scales[:, g])


def test_given_params_equal_static_groups_when_they_are_ours():
    W, H, _ = correlated_problem(32, 256, seed=3)
    ours = mk.gptq_quantize(W, H, bits=4, group_size=64, act_order=True, static_groups=True)
    given = mk.gptq_quantize(W, H, bits=4, group_size=64, act_order=True, scales=ours.scales, zeros=ours.zeros)
    assert torch.equal(given.codes, ours.codes) and given.loss == ours.loss


def test_zero_point_of_zero_is_kept_but_not_exported_as_v1():
    W, H, _ = correlated_problem(32, 128, seed=4)
    scales, zeros = observer_params(W.abs(), 4, 32, seed=2)  # all-positive rows: xmin = 0 → zero 0
    assert (zeros == 0).any()
    r = mk.gptq_quantize(W.abs(), H, bits=4, group_size=32, scales=scales, zeros=zeros)
    with pytest.raises(ValueError, match="zero point of 0"):
        r.to_gptq("gptq")
    r.to_gptq("gptq_v2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scales=torch.ones(8, 4)), "must be given together"),
        (dict(scales=torch.ones(8, 3), zeros=torch.ones(8, 3)), r"scales must be a \[N, G\] = \[8, 4\]"),
        (dict(scales=torch.zeros(8, 4), zeros=torch.ones(8, 4)), "scales must be finite and > 0"),
        (dict(scales=torch.ones(8, 4), zeros=torch.full((8, 4), 1.5)), r"zeros must be integers in \[0, 15\]"),
        (dict(scales=torch.ones(8, 4), zeros=torch.full((8, 4), 16.0)), r"zeros must be integers in \[0, 15\]"),
        (dict(scales=torch.ones(8, 4), zeros=torch.ones(8, 4), mse=True), "cannot be combined with given"),
        (dict(damp_steps=(0.005,)), "damp_steps must be increasing fractions above damp"),
        (dict(damp_steps=(0.1, 0.05)), "damp_steps must be increasing"),
    ],
)
def test_bad_fixed_params_and_damp_steps(kwargs, match):
    W, H, _ = correlated_problem(8, 128, seed=7)
    with pytest.raises(ValueError, match=match):
        mk.gptq_quantize(W, H, bits=4, group_size=32, **kwargs)


def test_damp_steps_schedule_is_followed():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 128, generator=g)  # rank 40 < 128: undamped H is singular
    H = X.T @ X
    W = torch.randn(16, 128, generator=g)
    r = mk.gptq_quantize(W, H, bits=4, group_size=128, damp=0.0, damp_steps=(0.0025, 0.004))
    assert r.damp == 0.0025, "the first step of the caller's schedule that factorises is used"
    with pytest.raises(NotPositiveDefiniteError, match="even with damping 0.0"):
        mk.gptq_quantize(W, H, bits=4, group_size=128, damp=0.0, damp_steps=())
