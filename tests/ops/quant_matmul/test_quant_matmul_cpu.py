"""The C++ packed low-bit matmul (``csrc/quant_matmul``) through its launcher ``cpu_quant_matmul``.

Ground truth is ``x.double() @ W.double().T`` with ``W = (code − zero[:, g]) · scale[:, g]`` built in
float64 from the codes, zeros and fp16 scales the test draws (never from the kernel's own unpacking);
the checkpoint tensors are packed with ``formats.gptq``. Outputs are NaN-filled before each call, so an
unwritten entry fails, and written into a wider buffer whose padding must stay NaN.
"""

from __future__ import annotations

import pytest
import torch

from maca_kernels import _C
from maca_kernels.formats.gptq import pack_gptq, pack_gptq_zeros
from maca_kernels.ops.quant_matmul.cpu_kernel import cpu_quant_matmul
from maca_kernels.ops.quant_matmul.reference import quant_matmul_reference

TOL = 1e-5  # fp32 math against float64 (x values are upcast exactly)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# N: odd multiples of what qzeros packing allows (32/bits, 32 for 3-bit); 36 and 40 are not multiples
# of the kernels' 8- and 16-column vectors.
N_FOR_BITS = {2: 48, 3: 96, 4: 40, 8: 36}


def make_case(N, K, bits, group_size, convention, act_order, seed=0):
    """Checkpoint tensors plus the float64 dequantized weight ``[N, K]``."""
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    gs = K if group_size == -1 else group_size
    G = K // gs
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32)
    zmin = 1 if convention == "gptq" else 0  # v1 cannot store a zero point of 0
    zeros = torch.randint(zmin, maxq + 1, (N, G), generator=g, dtype=torch.int32)
    scales = (torch.rand(N, G, generator=g) * 0.03 + 1e-3).to(torch.float16)
    scales[::3] *= -1  # negative scales are legal in the format
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    W = (codes.double() - zeros.double()[:, g_idx]) * scales.double()[:, g_idx]
    qweight = pack_gptq(codes, bits)
    qzeros = pack_gptq_zeros(zeros, bits, convention)
    return qweight, scales.t().contiguous(), qzeros, g_idx.to(torch.int32), W


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def run_checked(x, qweight, scales, qzeros, g_idx, bits, group_size, convention, W, **kw):
    """Calls the kernel into a NaN-filled, padded output; checks padding and accuracy; returns the error."""
    M, N = x.shape[0], qweight.shape[1]
    buf = torch.full((M, N + 5), float("nan"))
    out = buf[:, :N]
    y = cpu_quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, convention, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isnan(buf[:, N:]).all(), "wrote outside [M, N]"
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    want = x.double() @ W.T
    err = rel_err(y, want)
    assert err <= TOL, f"relative error {err:.3g} > {TOL}"
    return err


# ----------------------------------------------------------------------------------------------
# accuracy over bits × convention × groups × act-order × M × dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True], ids=["sorted", "act_order"])
@pytest.mark.parametrize("group_size", [32, 128, -1], ids=["g32", "g128", "g-1"])
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_float64(bits, convention, group_size, act_order):
    N, K = N_FOR_BITS[bits], 256
    qweight, scales, qzeros, g_idx, W = make_case(N, K, bits, group_size, convention, act_order, seed=bits)
    for i, M in enumerate([1, 3, 6, 16, 67]):  # 6: two row passes of the small-M path
        x = randn(M, K, dtype=DTYPES[i % 3], seed=10 * bits + i)
        # act-order needs g_idx; sorted groups go both ways (g_idx=None and the explicit identity map)
        gi = g_idx if act_order or i % 2 else None
        run_checked(x, qweight, scales, qzeros, gi, bits, group_size, convention, W)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M", [1, 3, 16, 67])
def test_strided_x_rows(M, dtype):
    """x rows further apart than K (a column slice of a wider tensor) are read in place."""
    bits, K = 4, 256
    qweight, scales, qzeros, g_idx, W = make_case(N_FOR_BITS[bits], K, bits, 128, "gptq", False, seed=3)
    x = randn(M, K + 24, dtype=dtype, seed=M)[:, 7 : 7 + K]
    assert x.stride(0) == K + 24
    run_checked(x, qweight, scales, qzeros, None, bits, 128, "gptq", W)
    # a non-unit inner stride is accepted too (copied by the launcher)
    xt = randn(K, M, dtype=dtype, seed=M).t()
    run_checked(xt, qweight, scales, qzeros, None, bits, 128, "gptq", W)


@pytest.mark.parametrize(
    "bits,N,K,M,group_size,act_order",
    [
        (4, 8 * 37, 512, 1, 128, False),  # several threads' column ranges, GEMV path
        (4, 8 * 37, 512, 5, 128, True),  # tile path, K spans two 256-row tiles, 5-row register tile
        (8, 4 * 67, 512, 2, 64, False),  # GEMV path with an 8-bit 4-column tail
        (8, 4 * 67, 512, 200, 64, True),  # M beyond one 192-row block
        (3, 32 * 5, 384, 4, 128, False),  # GEMV path, three words per packing run
        (3, 32 * 5, 384, 7, 16, False),  # groups smaller than the 32-value 3-bit run: tile path
        (2, 16 * 9, 320, 3, 32, True),
        (2, 16 * 9, 320, 1, 8, False),  # group of 8 < 16-value 2-bit run
    ],
)
def test_larger_shapes(bits, N, K, M, group_size, act_order):
    qweight, scales, qzeros, g_idx, W = make_case(N, K, bits, group_size, "gptq", act_order, seed=N + K)
    x = randn(M, K, seed=M)
    run_checked(x, qweight, scales, qzeros, g_idx if act_order else None, bits, group_size, "gptq", W)


@pytest.mark.parametrize("num_threads", [1, 2, 3, 16])
@pytest.mark.parametrize("M", [1, 9])
def test_thread_counts(num_threads, M):
    """Any thread count (more threads than 16-column units included) gives the same, accurate result."""
    bits, K = 8, 256
    qweight, scales, qzeros, _, W = make_case(N_FOR_BITS[bits], K, bits, 32, "gptq_v2", False, seed=5)
    x = randn(M, K, seed=1)
    run_checked(x, qweight, scales, qzeros, None, bits, 32, "gptq_v2", W, num_threads=num_threads)


def test_unsorted_monotone_g_idx():
    """A sorted g_idx with unequal groups is not k // gs: it must take the per-k lookup."""
    bits, N, K = 4, 40, 256
    qweight, scales, qzeros, _, _ = make_case(N, K, bits, 32, "gptq", False, seed=9)  # G = 8
    g_idx = torch.sort(torch.randint(0, 8, (K,), generator=torch.Generator().manual_seed(2))).values.int()
    W = quant_matmul_reference(
        torch.eye(K, dtype=torch.float64), qweight, scales, qzeros, g_idx, bits, "gptq", dtype=torch.float64
    ).T
    for M in (1, 8):
        run_checked(randn(M, K, seed=M), qweight, scales, qzeros, g_idx, bits, 32, "gptq", W)


def test_extreme_zero_fields():
    """All-ones v1 zero fields (zero = 2^bits) and v2 zeros of 0 decode per field, without carries."""
    for bits in (2, 3, 4, 8):
        N, K = N_FOR_BITS[bits], 64
        qweight, scales, _, _, _ = make_case(N, K, bits, 32, "gptq", False, seed=bits)
        qzeros = torch.full((2, N * bits // 32), -1, dtype=torch.int32)  # every field all ones
        codes = torch.randint(0, 1 << bits, (N, K), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        qweight = pack_gptq(codes, bits)
        g = torch.arange(K) // 32
        for convention, zero in (("gptq", 1 << bits), ("gptq_v2", (1 << bits) - 1)):
            W = (codes.double() - zero) * scales.t().double()[:, g]
            run_checked(randn(2, K, seed=bits), qweight, scales, qzeros, None, bits, 32, convention, W)


@pytest.mark.parametrize("scale_exp", [-100, -40, 40, 100])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_activation_scales(bits, scale_exp):
    """The small-M path pre-scales x by powers of two (per-row exponent offset): tiny and huge rows stay
    exact, including rows of very different magnitude in one call."""
    N, K = N_FOR_BITS[bits], 256
    qweight, scales, qzeros, _, W = make_case(N, K, bits, 64, "gptq_v2", False, seed=bits)
    x = randn(3, K, seed=scale_exp & 0xFF)
    x[0] *= 2.0**scale_exp
    x[2] *= 2.0 ** (-scale_exp // 2)
    y = cpu_quant_matmul(x, qweight, scales, qzeros, None, bits, 64, "gptq_v2")
    want = x.double() @ W.T
    for m in range(3):  # row by row: the rows differ by up to 2^150
        assert rel_err(y[m], want[m]) <= TOL, f"row {m}"


def test_reference_matches_float64():
    bits, N, K = 3, 64, 128
    qweight, scales, qzeros, g_idx, W = make_case(N, K, bits, 32, "gptq_v2", True, seed=4)
    x = randn(5, K, seed=0)
    got = quant_matmul_reference(x, qweight, scales, qzeros, g_idx, bits, 32, "gptq_v2")
    assert got.dtype == torch.float32 and got.shape == (5, N)
    assert rel_err(got, x.double() @ W.T) <= TOL


def test_empty_and_default_out():
    bits, N, K = 4, 40, 64
    qweight, scales, qzeros, _, W = make_case(N, K, bits, 32, "gptq", False)
    y = cpu_quant_matmul(torch.empty(0, K), qweight, scales, qzeros, None, bits, 32)
    assert y.shape == (0, N) and y.dtype == torch.float32
    x = randn(2, K)
    y = cpu_quant_matmul(x, qweight, scales, qzeros, None, bits, 32)
    assert y.shape == (2, N) and rel_err(y, x.double() @ W.T) <= TOL


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good():
    bits, N, K = 4, 40, 256
    qweight, scales, qzeros, g_idx, _ = make_case(N, K, bits, 128, "gptq", True)
    return dict(
        x=randn(3, K),
        qweight=qweight,
        scales=scales,
        qzeros=qzeros,
        g_idx=None,
        bits=bits,
        group_size=128,
        checkpoint_format="gptq",
    ), g_idx


def _call(base, **changes):
    kw = {**base, **changes}
    out = kw.pop("out", None)
    return cpu_quant_matmul(**kw, **({} if out is None else {"out": out}))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda b: {"bits": 5}, "bits"),
        (lambda b: {"bits": True}, "bits"),
        (lambda b: {"checkpoint_format": "awq"}, "checkpoint_format"),
        (lambda b: {"x": b["x"].to(torch.int32)}, "x must be"),
        (lambda b: {"x": b["x"].double()}, "x must be"),
        (lambda b: {"x": b["x"][None]}, "x must be 2-D"),
        (lambda b: {"x": randn(3, 250)}, "K = x.shape"),
        (lambda b: {"x": randn(3, 264)}, "qweight must be \\[K·bits/32, N\\]"),
        (lambda b: {"qweight": b["qweight"].long()}, "qweight"),
        (lambda b: {"qweight": b["qweight"].t().contiguous().t()}, "qweight must be contiguous"),
        (lambda b: {"qweight": b["qweight"][:, :36].contiguous()}, "N = qweight.shape"),
        (lambda b: {"scales": b["scales"].float()}, "scales"),
        (lambda b: {"scales": b["scales"][:, :32].contiguous()}, "scales must be"),
        (lambda b: {"qzeros": b["qzeros"][:1]}, "qzeros must be"),
        (lambda b: {"qzeros": b["qzeros"].float()}, "qzeros"),
        (lambda b: {"group_size": 96}, "group_size"),
        (lambda b: {"group_size": 0}, "group_size"),
        (lambda b: {"group_size": 64}, "G = 2"),
        (lambda b: {"group_size": -1}, "G = 2"),
        (lambda b: {"g_idx": torch.zeros(255, dtype=torch.int32)}, "g_idx must be 1-D"),
        (lambda b: {"g_idx": torch.full((256,), 2, dtype=torch.int32)}, r"g_idx must lie in \[0, G − 1\]"),
        (lambda b: {"g_idx": torch.full((256,), -1, dtype=torch.int64)}, "g_idx must lie"),
        (lambda b: {"g_idx": torch.zeros(256)}, "g_idx must be an integer"),
        (lambda b: {"out": torch.empty(3, 41)}, "out must be"),
        (lambda b: {"out": torch.empty(3, 40, dtype=torch.float16)}, "out must be"),
        (lambda b: {"out": torch.empty(40, 3).t()}, "out must have unit stride"),
    ],
)
def test_bad_inputs(good, change, match):
    base, _ = good
    with pytest.raises((ValueError, TypeError), match=match):
        _call(base, **change(base))


def test_good_inputs_pass(good):
    base, g_idx = good
    _call(base)
    _call(base, g_idx=g_idx)
    _call(base, g_idx=g_idx.long())  # any integer g_idx dtype


def test_native_bounds_checks(good):
    """The C++ layer itself refuses what would read out of bounds (ValueError through pybind11)."""
    base, _ = good
    x, qw, sc, qz = base["x"], base["qweight"], base["scales"], base["qzeros"]
    y = torch.empty(3, 40)
    bad_gidx = torch.full((256,), 7, dtype=torch.int32)

    def call(**kw):
        a = dict(
            y_ptr=y.data_ptr(),
            ldy=40,
            x_ptr=x.data_ptr(),
            x_dtype=0,
            ldx=256,
            M=3,
            N=40,
            K=256,
            qweight_ptr=qw.data_ptr(),
            qzeros_ptr=qz.data_ptr(),
            scales_ptr=sc.data_ptr(),
            g_idx_ptr=0,
            G=2,
            group_size=128,
            bits=4,
            zero_offset=1,
        )
        a.update(kw)
        _C.quant_matmul(**a)

    call()
    for kw in (
        {"g_idx_ptr": bad_gidx.data_ptr()},
        {"bits": 5},
        {"K": 250},
        {"N": 36},
        {"ldx": 100},
        {"group_size": 64},
        {"qweight_ptr": 0},
        {"x_dtype": 7},
    ):
        with pytest.raises(ValueError, match="quant_matmul"):
            call(**kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["sorted", "act_order"])
def test_dequantize_is_the_formula_in_fp32_bit_for_bit(bits, convention, act_order):
    from maca_kernels.ops.quant_matmul.cpu_kernel import cpu_dequantize

    N, K, gs = N_FOR_BITS[bits] * 7, 192, 64  # N spans chunks of 256 columns with a ragged end
    qweight, scales, qzeros, g_idx, W = make_case(N, K, bits, gs, convention, act_order, seed=bits)
    wt = cpu_dequantize(qweight, scales, qzeros, g_idx if act_order else None, bits, gs, convention)
    assert wt.shape == (K, N) and wt.dtype == torch.float32
    assert torch.equal(wt.double(), W.T.float().double())  # (code − zero)·scale, one fp32 rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_order", [False, True], ids=["sorted", "act_order"])
def test_many_rows_take_the_dequantized_gemm(dtype, act_order, monkeypatch):
    """From DEQUANT_MIN_ROWS rows the weight is decoded once and multiplied by torch's GEMM: same accuracy, same
    output contract (the given out, its padding untouched)."""
    import maca_kernels.ops.quant_matmul.cpu_kernel as ck

    calls = []
    real = ck._dequantize
    monkeypatch.setattr(ck, "_dequantize", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ck, "DEQUANT_MIN_ROWS", 9)
    qweight, scales, qzeros, g_idx, W = make_case(40, 128, 4, 32, "gptq", act_order, seed=3)
    for M, decoded in ((8, False), (9, True), (37, True)):
        calls.clear()
        x = randn(M, 128, dtype=dtype, seed=M)
        err = run_checked(x, qweight, scales, qzeros, g_idx if act_order else None, 4, 32, "gptq", W)
        assert err < TOL and bool(calls) == decoded
