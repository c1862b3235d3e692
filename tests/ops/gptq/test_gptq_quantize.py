"""gptq_quantize: the reference's invariants, the Triton sweep (interpreter) and the C++ sweep against the
reference, robustness (dead columns, damping escalation, hopeless H) and bad input."""

from __future__ import annotations

import pytest
import torch
from gptq_helpers import correlated_problem, rtn_loss
from helpers import needs_interpreter

import maca_kernels as mk

# (bits, group_size, sym, act_order, static_groups, gptaq, reg, mse) — covers every option and bit width
CASES = [
    (4, 128, False, False, False, False, None, False),
    (4, 32, True, True, False, False, None, False),
    (3, 32, False, True, False, False, None, False),
    (3, 128, True, False, False, True, None, False),
    (2, -1, True, False, False, False, None, False),
    (2, 32, False, True, True, False, None, False),
    (8, 128, False, True, True, True, None, False),
    (4, -1, False, True, False, True, 0.05, False),
    (4, 32, False, False, False, False, 0.1, True),
    (3, 32, True, True, True, False, None, True),
]


def case_id(c):
    bits, g, sym, act, static, gptaq, reg, mse = c
    parts = [f"{bits}b", f"g{g}", "sym" if sym else "asym"]
    parts += [n for n, on in (("act", act), ("static", static), ("gptaq", gptaq), ("reg", reg), ("mse", mse)) if on]
    return "-".join(parts)


def run(case, shape, backend, seed=0):
    bits, g, sym, act, static, gptaq, reg, mse = case
    W, H, dxxt = correlated_problem(*shape, seed=seed)
    return W, H, mk.gptq_quantize(W, H, bits=bits, group_size=g, sym=sym, act_order=act, static_groups=static,
                                  mse=mse, dxxt=dxxt if gptaq else None, reg=reg, backend=backend)


def check_invariants(r, W, bits, group_size):
    N, K = W.shape
    G = 1 if group_size == -1 else K // group_size
    maxq = 2**bits - 1
    assert r.codes.dtype == torch.int32 and r.codes.shape == (N, K)
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= maxq
    assert r.scales.shape == (N, G) and r.zeros.shape == (N, G) and r.g_idx.shape == (K,)
    assert int(r.zeros.min()) >= 1 and int(r.zeros.max()) <= maxq, "v1 checkpoints cannot hold a zero of 0"
    assert torch.equal(r.scales, r.scales.half().float()), "scales must survive the fp16 checkpoint exactly"
    g = r.g_idx.long()
    assert torch.equal(r.weight, (r.codes - r.zeros[:, g]).float() * r.scales[:, g])
    assert torch.bincount(g, minlength=G).tolist() == [K // G] * G


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_invariants_and_beats_rtn(case):
    bits, g, sym, act, static, gptaq, reg, mse = case
    W, H, r = run(case, (48, 256), "reference")
    check_invariants(r, W, bits, g)
    dW = (W - r.weight).double()
    assert r.loss == pytest.approx(float(((dW @ H.double()) * dW).sum()), rel=1e-4)
    if not gptaq:  # GPTAQ minimises the error against the full-precision inputs, not tr(ΔW H ΔWᵀ)
        assert r.loss < rtn_loss(W, H, bits, g, sym), "GPTQ must beat round-to-nearest on a real-looking H"


@needs_interpreter
@pytest.mark.parametrize("shape", [(96, 256), (70, 320)], ids=["96x256", "70x320"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case, shape):
    bits, g, *_ = case
    if shape[1] % max(g, 1) and g > 0:
        pytest.skip("K must be a multiple of the group size")
    W, H, ref = run(case, shape, "reference", seed=1)
    _, _, ker = run(case, shape, "triton", seed=1)
    check_invariants(ker, W, bits, g)
    assert (ker.codes == ref.codes).float().mean().item() >= 0.99
    assert ker.loss == pytest.approx(ref.loss, rel=5e-3)
    assert torch.equal(ker.g_idx, ref.g_idx)


@pytest.mark.parametrize("shape", [(96, 256), (70, 320)], ids=["96x256", "70x320"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpp_matches_reference(case, shape):
    """The C++ sweep repeats the reference's fp32 operations one by one: the codes agree (bit for bit,
    up to near-ties of the MSE search's error sums)."""
    bits, g, *_ = case
    if shape[1] % max(g, 1) and g > 0:
        pytest.skip("K must be a multiple of the group size")
    W, H, ref = run(case, shape, "reference", seed=1)
    _, _, ker = run(case, shape, "cpp", seed=1)
    check_invariants(ker, W, bits, g)
    assert (ker.codes == ref.codes).float().mean().item() >= 0.99
    assert ker.loss == pytest.approx(ref.loss, rel=5e-3)
    assert torch.equal(ker.g_idx, ref.g_idx)


@pytest.mark.parametrize(
    "N, K, kwargs",
    [
        (37, 200, dict(bits=4, group_size=40)),  # rows not a multiple of the row tile; blocks of 120 + 80
        (5, 200, dict(bits=3, group_size=-1, block_size=48, act_order=True)),  # fewer rows than a tile; K % block
        (70, 200, dict(bits=2, group_size=20, block_size=50, act_order=True, static_groups=True, sym=True)),
        (33, 96, dict(bits=8, group_size=32, block_size=64, mse=True)),
    ],
    ids=["37x200-g40", "5x200-g-1-b48", "70x200-g20-b50-static", "33x96-b64-mse"],
)
def test_cpp_odd_shapes(N, K, kwargs):
    W, H, dxxt = correlated_problem(N, K, seed=9)
    for extra in ({}, {"dxxt": dxxt}):
        ref = mk.gptq_quantize(W, H, backend="reference", **kwargs, **extra)
        ker = mk.gptq_quantize(W, H, backend="cpp", **kwargs, **extra)
        check_invariants(ker, W, kwargs["bits"], kwargs["group_size"])
        assert (ker.codes == ref.codes).float().mean().item() >= 0.99
        assert ker.loss == pytest.approx(ref.loss, rel=5e-3)


def test_cpp_fp16_scale_rounding():
    """The kernel's fp16 rounding of scales (F16C and the portable fallback) is torch's, subnormals included."""
    from maca_kernels._native import require_native
    from maca_kernels.ops.gptq.quantizer import round_scale

    C = require_native("gptq_quantize")
    g = torch.Generator().manual_seed(10)
    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    mid = (halves[:-1] + halves[1:]) / 2  # exact ties between neighbouring fp16 values
    x = torch.cat([halves, mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e9)),
                   torch.exp(torch.randn(100_000, generator=g) * 8), torch.tensor([0.0, -1.0, 1e-30, 7e4, 1e9])])
    want = round_scale(x)
    for software in (False, True):
        got = x.clone()
        C.gptq_round_scale(got.data_ptr(), got.numel(), software)
        assert torch.equal(got, want), f"software={software}"


def test_cpp_backend_needs_the_extension(monkeypatch):
    import maca_kernels.ops.gptq.cpu_kernel as cpu_kernel

    W, H, _ = correlated_problem(8, 64, seed=11)
    monkeypatch.setattr(cpu_kernel, "require_native", lambda op: object())  # an extension without the kernel
    with pytest.raises(RuntimeError, match="predates the CPU GPTQ kernel"):
        mk.gptq_quantize(W, H, group_size=32)
    assert mk.gptq_quantize(W, H, group_size=32, backend="reference").codes.shape == (8, 64)


def test_act_order_group_index():
    W, H, _ = correlated_problem(16, 128, seed=2)
    r = mk.gptq_quantize(W, H, bits=4, group_size=32, act_order=True)
    order = torch.argsort(H.diagonal(), descending=True, stable=True)
    assert torch.equal(r.perm, order)
    # dynamic groups follow the processing order: the first 32 processed columns form group 0
    assert torch.equal(r.g_idx[order].long(), torch.arange(128) // 32)
    s = mk.gptq_quantize(W, H, bits=4, group_size=32, act_order=True, static_groups=True)
    assert torch.equal(s.g_idx.long(), torch.arange(128) // 32)  # static: groups of original columns


def test_blocked_sweep_equals_column_by_column():
    """Lazy block updates are an exact reorganisation (GPTAQ included): block size changes nothing."""
    W, H, dxxt = correlated_problem(32, 128, seed=3)
    a = mk.gptq_quantize(W, H, bits=3, group_size=32, dxxt=dxxt, block_size=32)
    b = mk.gptq_quantize(W, H, bits=3, group_size=32, dxxt=dxxt, block_size=128)
    assert (a.codes == b.codes).float().mean().item() >= 0.99
    assert a.loss == pytest.approx(b.loss, rel=1e-3)


def test_dead_columns():
    W, H, _ = correlated_problem(24, 128, seed=4)
    dead = torch.tensor([0, 5, 77])
    H[dead, :] = 0
    H[:, dead] = 0
    r = mk.gptq_quantize(W, H, bits=4, group_size=64, act_order=True)
    assert torch.all(r.weight[:, dead] == 0), "dead columns quantize to exactly zero"
    assert r.loss == pytest.approx(float((((W - r.weight) @ H) * (W - r.weight)).sum()), rel=1e-4)


def test_rank_deficient_hessian_raises_damping():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 128, generator=g)  # rank 40 < 128
    H = X.T @ X
    W = torch.randn(16, 128, generator=g)
    r = mk.gptq_quantize(W, H, bits=4, group_size=128, damp=0.0)
    assert r.damp > 0.0, "a singular H must be damped, and the damping used reported"
    assert torch.isfinite(r.weight).all()


def test_hopeless_hessian_names_the_layer():
    W = torch.randn(8, 64)
    H = -100.0 * torch.eye(64)
    with pytest.raises(RuntimeError, match="layer model.layers.3.mlp.down_proj: H is not positive definite"):
        mk.gptq_quantize(W, H, group_size=32, name="model.layers.3.mlp.down_proj")


def test_to_gptq_round_trip():
    W, H, _ = correlated_problem(64, 256, seed=6)
    for bits in (2, 3, 4, 8):
        r = mk.gptq_quantize(W, H, bits=bits, group_size=128, act_order=True)
        for convention in ("gptq", "gptq_v2"):
            ck = r.to_gptq(convention)
            assert ck["qweight"].dtype == torch.int32 and ck["qweight"].shape == (256 * bits // 32, 64)
            assert ck["scales"].dtype == torch.float16 and ck["scales"].shape == (2, 64)
            back = mk.dequantize_gptq(ck["qweight"], ck["scales"], ck["qzeros"], ck["g_idx"], bits, convention)
            assert torch.equal(back, r.weight)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bits=5), ValueError, "bits must be one of"),
        (dict(group_size=48), ValueError, "divisible by group_size = 48"),
        (dict(group_size=0), ValueError, "group_size must be -1"),
        (dict(block_size=0), ValueError, "block_size must be a positive int"),
        (dict(damp=-0.1), ValueError, "damp must be"),
        (dict(dxxt=torch.zeros(3, 3)), ValueError, r"dxxt \(GPTAQ cross term\) must be \[K, K\]"),
        (dict(reg=-1.0), ValueError, "reg must be"),
        (dict(saliency=torch.ones(5)), ValueError, "saliency must be"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    W, H, _ = correlated_problem(8, 128, seed=7)
    with pytest.raises(exc, match=match):
        mk.gptq_quantize(W, H, **kwargs)


@pytest.mark.parametrize("bits", [4.0, True, 5])
def test_bits_must_be_a_supported_int(bits):
    """4.0 == 4, but the kernels take an int: refused up front (it used to fail inside the extension)."""
    W, H, _ = correlated_problem(8, 128, seed=7)
    for call in (lambda: mk.gptq_quantize(W, H, bits=bits, name="fc"), lambda: mk.rtn_quantize(W, bits, 32)):
        with pytest.raises(ValueError, match=rf"bits must be one of \(2, 3, 4, 8\), got {bits!r}"):
            call()
    with pytest.raises(ValueError, match="group_size must be"):  # True == 1 is not a group size either
        mk.gptq_quantize(W, H, bits=4, group_size=True)
    for call in (lambda: mk.gptq_quantize(W, H, bits=4, sym="no"), lambda: mk.rtn_quantize(W, 4, 32, sym="no")):
        with pytest.raises(ValueError, match="sym must be a bool, got 'no'"):
            call()


def test_bad_tensors():
    W, H, _ = correlated_problem(8, 128, seed=8)
    with pytest.raises(ValueError, match=r"H must be a floating-point \[K, K\]"):
        mk.gptq_quantize(W, H[:64, :64])
    with pytest.raises(ValueError, match="W must be a floating-point"):
        mk.gptq_quantize(W.int(), H)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        mk.gptq_quantize(Wn, H)
    Hn = H.clone()
    Hn[1, 2] = float("inf")
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        mk.gptq_quantize(W, Hn, name="q_proj")


def test_compute_loss_off_skips_only_the_loss():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 64, generator=g)
    W = torch.randn(32, 64, generator=g)
    H = X.T @ X / 256
    a = mk.gptq_quantize(W, H, bits=4, group_size=32)
    b = mk.gptq_quantize(W, H, bits=4, group_size=32, compute_loss=False)
    assert torch.equal(a.codes, b.codes) and a.loss > 0 and b.loss != b.loss  # NaN
