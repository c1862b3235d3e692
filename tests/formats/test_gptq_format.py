"""GPTQ checkpoint packing (SPEC §3): round trips, hand-written bit patterns, zero conventions,
dequantization against a float64 reference, and every documented bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from maca_kernels.formats import (
    dequantize_gptq,
    pack_gptq,
    pack_gptq_zeros,
    pack_scales,
    unpack_gptq,
    unpack_gptq_zeros,
    unpack_scales,
)

BITS = [2, 3, 4, 8]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def i32(word: int) -> int:
    """A 32-bit pattern written as an unsigned literal → the int32 value a checkpoint stores."""
    assert 0 <= word < 2**32
    return word - 2**32 if word >= 2**31 else word


def rand_codes(n, k, bits, seed, low=0, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 2**bits, (n, k), generator=g).to(dtype)


def unit(bits):
    """The K / N step the packing rule demands."""
    return 32 if bits == 3 else 32 // bits


# ----------------------------------------------------------------------------------------------
# independent reference: a line-by-line port of the AutoGPTQ / GPTQ-for-LLaMa `pack` loop (uint32)


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """``intweight`` uint32 ``[L, M]`` → uint32 ``[L/32·bits, M]``, packed along L."""
    intweight = intweight.astype(np.uint32)
    out = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= intweight[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= intweight[j] << np.uint32(3 * (j - i))
            i += 10
            out[row] |= intweight[i] << np.uint32(30)
            row += 1
            out[row] |= (intweight[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= intweight[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            out[row] |= intweight[i] << np.uint32(31)
            row += 1
            out[row] |= (intweight[i] >> np.uint32(1)) & np.uint32(0x3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= intweight[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return out


def as_int32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


# ----------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n, k_units", [(1, 1), (3, 2), (67, 3), (64, 4)])
def test_qweight_round_trip(bits, n, k_units, device):
    k = unit(bits) * k_units
    codes = rand_codes(n, k, bits, seed=1000 * bits + 10 * n + k_units).to(device)
    qweight = pack_gptq(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (k * bits // 32, n)
    assert qweight.device == codes.device
    back = unpack_gptq(qweight, bits, k)
    assert back.dtype == torch.int32 and back.shape == (n, k)
    assert torch.equal(back, codes.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fill", ["zeros", "max"])
def test_qweight_round_trip_extremes(bits, fill):
    n, k = 5, 2 * unit(bits)
    maxq = 2**bits - 1
    codes = torch.zeros(n, k, dtype=torch.int32) if fill == "zeros" else torch.full((n, k), maxq, dtype=torch.int32)
    qweight = pack_gptq(codes, bits)
    # every value bit set → every word all-ones (= -1 as int32); no value bit set → 0
    assert torch.equal(qweight, torch.full_like(qweight, 0 if fill == "zeros" else -1))
    assert torch.equal(unpack_gptq(qweight, bits, k), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_qweight_accepts_integer_dtypes(dtype):
    codes = rand_codes(7, 16, 4, seed=3, dtype=dtype)
    assert torch.equal(unpack_gptq(pack_gptq(codes, 4), 4, 16), codes.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_qweight_matches_autogptq_pack_loop(bits):
    n, k = 9, 2 * 32  # the reference loop packs whole 32-row blocks
    codes = rand_codes(n, k, bits, seed=77 + bits)
    want = as_int32(autogptq_pack_rows(codes.t().numpy(), bits))
    assert torch.equal(pack_gptq(codes, bits), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("n_units, g", [(1, 1), (2, 3), (3, 5)])
def test_qzeros_round_trip(bits, convention, n_units, g, device):
    n = unit(bits) * n_units
    low = 1 if convention == "gptq" else 0
    zeros = rand_codes(n, g, bits, seed=31 * bits + n_units + g, low=low).to(device)
    qzeros = pack_gptq_zeros(zeros, bits, checkpoint_format=convention)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (g, n * bits // 32)
    back = unpack_gptq_zeros(qzeros, bits, n, checkpoint_format=convention)
    assert back.dtype == torch.int32 and back.shape == (n, g)
    assert torch.equal(back, zeros.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
def test_qzeros_round_trip_extremes(bits, convention):
    n = unit(bits)
    maxq = 2**bits - 1
    lowest = 1 if convention == "gptq" else 0
    for val in (lowest, maxq):
        zeros = torch.full((n, 2), val, dtype=torch.int64)
        qz = pack_gptq_zeros(zeros, bits, convention)
        assert torch.equal(unpack_gptq_zeros(qz, bits, n, convention), zeros.to(torch.int32))
    # v2 with all-max zeros is an all-ones word; v1 with all-max zeros stores maxq − 1 per field
    full = pack_gptq_zeros(torch.full((n, 1), maxq), bits, "gptq_v2")
    assert torch.equal(full, torch.full_like(full, -1))


@pytest.mark.parametrize("bits", BITS)
def test_qzeros_match_autogptq_pack_loop(bits):
    n, g = 64, 3
    zeros = rand_codes(n, g, bits, seed=5 + bits, low=1)
    # AutoGPTQ v1: zeros -= 1, then the same loop along N on the [G, N] matrix transposed
    want = as_int32(autogptq_pack_rows((zeros - 1).numpy(), bits)).t()
    assert torch.equal(pack_gptq_zeros(zeros, bits, "gptq"), want)


# ----------------------------------------------------------------------------------------------
# hand-written bit patterns (independent of the implementation)


def test_known_4bit_word():
    # value k of the column sits at bit 4k: nibbles from high to low are v7..v0 = 8,7,...,1
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    qweight = pack_gptq(codes, 4)
    assert qweight.tolist() == [[i32(0x87654321)]]
    assert qweight.item() == -2023406815


def test_known_4bit_two_words_two_columns():
    # column 0: k = 0..15 → word 0 = 0x76543210, word 1 = 0xFEDCBA98
    # column 1: all 0xA → 0xAAAAAAAA in both words; qweight is [K·bits/32, N] = [2, 2]
    codes = torch.stack([torch.arange(16), torch.full((16,), 0xA)])
    assert pack_gptq(codes, 4).tolist() == [
        [i32(0x76543210), i32(0xAAAAAAAA)],
        [i32(0xFEDCBA98), i32(0xAAAAAAAA)],
    ]


def test_known_2bit_word():
    # value k at bit 2k. v15..v0 = 2,0,0,0, 3,3,3,3, 3,0,1,2, 2,1,0,3
    # bit pairs: 10 00 00 00 | 11 11 11 11 | 11 00 01 10 | 10 01 00 11
    #          = 1000 0000 1111 1111 1100 0110 1001 0011 = 0x80FFC693
    codes = torch.tensor([[3, 0, 1, 2, 2, 1, 0, 3, 3, 3, 3, 3, 0, 0, 0, 2]])
    assert pack_gptq(codes, 2).tolist() == [[i32(0x80FFC693)]]


def test_known_8bit_word():
    codes = torch.tensor([[0x01, 0x02, 0x03, 0xFF]])  # byte k at bit 8k
    assert pack_gptq(codes, 8).tolist() == [[i32(0xFF030201)]]


def test_known_3bit_words_mod8():
    # v_j = j mod 8, j = 0..31. In octal every 3-bit field is one digit.
    # w0: v9..v0 = 1,0,7,6,5,4,3,2,1,0 at bits 0..29 → 0o1076543210;
    #     v10 = 2 = 0b010, its low 2 bits (0b10) at bits 30–31 → + (0b10 << 30)
    #     = 0b10_001_000_111_110_101_100_011_010_001_000 = 0x88FAC688
    # w1: v10's bit 2 (= 0) at bit 0; v20..v11 = 4,3,2,1,0,7,6,5,4,3 at bits 1..30 → 0o4321076543 << 1;
    #     v21 = 5 = 0b101, its bit 0 (= 1) at bit 31 → + (1 << 31)
    #     = 0b1_100_011_010_001_000_111_110_101_100_011_0 = 0xC688FAC6
    # w2: v21's bits 1–2 (= 0b10) at bits 0–1; v31..v22 = 7,6,5,4,3,2,1,0,7,6 at bits 2..31
    #     → (0o7654321076 << 2) | 0b10
    #     = 0b111_110_101_100_011_010_001_000_111_110_10 = 0xFAC688FA
    w0, w1, w2 = 0x88FAC688, 0xC688FAC6, 0xFAC688FA
    assert w0 == (0b10 << 30) | 0o1076543210
    assert w1 == (1 << 31) | (0o4321076543 << 1) | 0
    assert w2 == (0o7654321076 << 2) | 0b10
    codes = (torch.arange(32) % 8)[None]
    qweight = pack_gptq(codes, 3)
    assert qweight.tolist() == [[i32(w0)], [i32(w1)], [i32(w2)]]
    assert torch.equal(unpack_gptq(qweight, 3, 32), codes.to(torch.int32))


def test_known_3bit_split_values():
    # only v10 = 0b110 and v21 = 0b101 are nonzero:
    # w0: v10's low bits 0b10 at bits 30–31 → bit 31 only           = 0x80000000
    # w1: v10's bit 2 (1) at bit 0, v21's bit 0 (1) at bit 31        = 0x80000001
    # w2: v21's bits 1–2 = 0b10 at bits 0–1                          = 0x00000002
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b110
    codes[0, 21] = 0b101
    qweight = pack_gptq(codes, 3)
    assert qweight.tolist() == [[i32(0x80000000)], [i32(0x80000001)], [0x00000002]]
    assert torch.equal(unpack_gptq(qweight, 3, 32), codes.to(torch.int32))


def test_known_3bit_second_block():
    # K = 64: the second run of 32 values starts a fresh 3-word group (rows 3..5)
    codes = torch.zeros(1, 64, dtype=torch.int64)
    codes[0, 32] = 7  # first value of block 1 → word 3, bits 0–2
    codes[0, 63] = 5  # last value of block 1 → word 5, bits 29–31 = 0b101 << 29
    assert pack_gptq(codes, 3).flatten().tolist() == [0, 0, 0, 7, 0, i32(0b101 << 29)]


def test_unpack_bit31_words():
    # raw patterns with bit 31 set read back exactly
    qweight = torch.tensor([[i32(0xF0000000)], [i32(0x80000001)]], dtype=torch.int32)
    codes = unpack_gptq(qweight, 4, 16)
    assert codes.tolist() == [[0] * 7 + [0xF] + [1] + [0] * 6 + [8]]


def test_known_qzeros_words():
    # zeros [N=8, G=1]; packed along N: field n at bit 4n
    zeros = torch.tensor([[2], [3], [4], [5], [6], [7], [8], [9]])
    # v1 stores zero − 1 = 1..8 → 0x87654321
    assert pack_gptq_zeros(zeros, 4, "gptq").tolist() == [[i32(0x87654321)]]
    # v2 stores the true zero 2..9 → 0x98765432
    assert pack_gptq_zeros(zeros, 4, "gptq_v2").tolist() == [[i32(0x98765432)]]
    # qzeros is [G, N·bits/32]: group row g holds zeros[:, g]
    two = torch.stack([torch.arange(1, 9), torch.full((8,), 0xC)], dim=1)  # [8, 2]
    assert pack_gptq_zeros(two, 4, "gptq_v2").tolist() == [[i32(0x87654321)], [i32(0xCCCCCCCC)]]


# ----------------------------------------------------------------------------------------------
# zero-point conventions


@pytest.mark.parametrize("bits", BITS)
def test_qzeros_v1_v2_fields_differ_by_one(bits):
    n = unit(bits) * 2
    zeros = rand_codes(n, 4, bits, seed=9 + bits, low=1)
    v1 = pack_gptq_zeros(zeros, bits, "gptq")
    v2 = pack_gptq_zeros(zeros, bits, "gptq_v2")
    # read both as raw fields (v2 unpack adds nothing)
    f1 = unpack_gptq_zeros(v1, bits, n, "gptq_v2")
    f2 = unpack_gptq_zeros(v2, bits, n, "gptq_v2")
    assert torch.equal(f2 - f1, torch.ones_like(f1))
    # and each reads back the same true zeros under its own convention
    assert torch.equal(unpack_gptq_zeros(v1, bits, n, "gptq"), unpack_gptq_zeros(v2, bits, n, "gptq_v2"))


@pytest.mark.parametrize("bits", BITS)
def test_qzeros_v1_zero_of_zero_raises(bits):
    zeros = torch.full((unit(bits), 2), 1)
    zeros[3, 1] = 0
    with pytest.raises(ValueError, match='zero point of 0.*checkpoint_format="gptq"'):
        pack_gptq_zeros(zeros, bits, "gptq")
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq_zeros(zeros, bits)  # v1 is the default
    # v2 stores it fine
    assert torch.equal(unpack_gptq_zeros(pack_gptq_zeros(zeros, bits, "gptq_v2"), bits, unit(bits), "gptq_v2"),
                       zeros.to(torch.int32))


def test_qzeros_v1_unpack_adds_one_per_field():
    # an all-ones v1 field (written by another tool) reads 2^bits in its own field, no carry
    qz = torch.tensor([[i32(0x0000000F)]], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-ones warning has its own test
        z = unpack_gptq_zeros(qz, 4, 8, "gptq")
    assert z.flatten().tolist() == [16, 1, 1, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# scales


def test_scales_round_trip():
    g = torch.Generator().manual_seed(4)
    s = torch.rand(67, 5, generator=g) * 0.1 + 1e-3
    ck = pack_scales(s)
    assert ck.dtype == torch.float16 and ck.shape == (5, 67) and ck.is_contiguous()
    back = unpack_scales(ck)
    assert back.dtype == torch.float32 and back.shape == (67, 5)
    assert torch.equal(back, s.half().float())
    assert torch.equal(unpack_scales(pack_scales(back)), back)  # fp16-representable: exact


# ----------------------------------------------------------------------------------------------
# dequantization


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
def test_dequantize_matches_float64(bits, convention, device):
    n, k, group = 64, 96 if bits == 3 else 80, 16
    groups = k // group
    g = torch.Generator().manual_seed(100 + bits)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(1 if convention == "gptq" else 0, 2**bits, (n, groups), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).half()
    # act-order: columns visited in a random order, group index by position in that order
    perm = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    assert not torch.equal(g_idx, torch.sort(g_idx).values)

    want = (codes.double() - zeros.double()[:, g_idx.long()]) * scales.double()[:, g_idx.long()]

    qweight = pack_gptq(codes, bits).to(device)
    qzeros = pack_gptq_zeros(zeros, bits, convention).to(device)
    sc = pack_scales(scales).to(device)
    got = dequantize_gptq(qweight, sc, qzeros, g_idx.to(device), bits, checkpoint_format=convention)
    assert got.dtype == torch.float32 and got.shape == (n, k) and got.device == qweight.device
    assert torch.equal(got.cpu().double(), want)  # exact: small integer × fp16 fits fp32


def test_dequantize_single_group():
    codes = rand_codes(32, 32, 4, seed=8)
    zeros = torch.full((32, 1), 8)
    scales = torch.full((32, 1), 0.5)
    got = dequantize_gptq(pack_gptq(codes, 4), pack_scales(scales), pack_gptq_zeros(zeros, 4),
                          torch.zeros(32, dtype=torch.int32), 4)
    assert torch.equal(got, (codes - 8).float() * 0.5)


# ----------------------------------------------------------------------------------------------
# bad input


def _ok_ckpt(bits=4, n=32, k=32, groups=2):
    codes = rand_codes(n, k, bits, seed=0)
    zeros = rand_codes(n, groups, bits, seed=1, low=1)
    scales = torch.full((n, groups), 0.25)
    g_idx = (torch.arange(k) // (k // groups)).to(torch.int32)
    return pack_gptq(codes, bits), pack_scales(scales), pack_gptq_zeros(zeros, bits), g_idx


QW, SC, QZ, GI = _ok_ckpt()
C4 = torch.zeros(4, 16, dtype=torch.int64)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        # bits
        (lambda: pack_gptq(C4, 5), ValueError, r"bits must be one of \(2, 3, 4, 8\), got 5"),
        (lambda: pack_gptq(C4, 1), ValueError, "bits must be one of"),
        (lambda: pack_gptq(C4, 4.0), ValueError, "bits must be one of"),
        (lambda: pack_gptq(C4, True), ValueError, "bits must be one of"),
        (lambda: unpack_gptq(QW, 6, 32), ValueError, "bits must be one of"),
        (lambda: pack_gptq_zeros(C4, 16), ValueError, "bits must be one of"),
        (lambda: unpack_gptq_zeros(QZ, 7, 32), ValueError, "bits must be one of"),
        (lambda: dequantize_gptq(QW, SC, QZ, GI, 5), ValueError, "bits must be one of"),
        # codes
        (lambda: pack_gptq([[1, 2]], 4), TypeError, "codes must be a torch.Tensor"),
        (lambda: pack_gptq(C4.float(), 4), TypeError, "codes must be an integer tensor, got dtype torch.float32"),
        (lambda: pack_gptq(C4.bool(), 4), TypeError, "codes must be an integer tensor"),
        (lambda: pack_gptq(torch.zeros(16, dtype=torch.int64), 4), ValueError, r"codes must be 2-D \[N, K\]"),
        (lambda: pack_gptq(C4 - 1, 4), ValueError, r"codes must lie in \[0, 15\] for bits=4, got values in \[-1, -1\]"),
        (lambda: pack_gptq(C4 + 16, 4), ValueError, r"codes must lie in \[0, 15\]"),
        (lambda: pack_gptq(C4 + 4, 2), ValueError, r"codes must lie in \[0, 3\]"),
        (lambda: pack_gptq(torch.full((2, 32), 8), 3), ValueError, r"codes must lie in \[0, 7\]"),
        (lambda: pack_gptq(torch.full((2, 4), 256), 8), ValueError, r"codes must lie in \[0, 255\]"),
        # K divisibility
        (lambda: pack_gptq(torch.zeros(2, 12, dtype=torch.int64), 4), ValueError,
         r"K \(codes.shape\[1\]\) = 12 must be a multiple of 8 for bits=4"),
        (lambda: pack_gptq(torch.zeros(2, 48, dtype=torch.int64), 3), ValueError,
         r"= 48 must be a multiple of 32 for bits=3 .*32 values into 3 words"),
        (lambda: pack_gptq(torch.zeros(2, 6, dtype=torch.int64), 2), ValueError, "multiple of 16 for bits=2"),
        (lambda: pack_gptq(torch.zeros(2, 6, dtype=torch.int64), 8), ValueError, "multiple of 4 for bits=8"),
        (lambda: unpack_gptq(QW, 4, 36), ValueError, "K = 36 must be a multiple of 8 for bits=4"),
        (lambda: unpack_gptq(torch.zeros(3, 2, dtype=torch.int32), 3, 16), ValueError,
         "K = 16 must be a multiple of 32 for bits=3"),
        (lambda: unpack_gptq(QW, 4, -8), ValueError, "K must be a non-negative int, got -8"),
        (lambda: unpack_gptq(QW, 4, 32.0), TypeError, "K must be a non-negative int"),
        # qweight
        (lambda: unpack_gptq(QW, 4, 64), ValueError,
         r"qweight must have K·bits/32 = 64·4/32 = 8 rows for K = 64, got shape \(4, 32\)"),
        (lambda: unpack_gptq(QW, 2, 32), ValueError, "qweight must have K·bits/32 = 32·2/32 = 2 rows"),
        (lambda: unpack_gptq(QW.long(), 4, 32), TypeError, "qweight must be an int32 tensor"),
        (lambda: unpack_gptq(QW.float(), 4, 32), TypeError, "qweight must be an int32 tensor"),
        (lambda: unpack_gptq(QW.flatten(), 4, 32), ValueError, r"qweight must be 2-D \[K·bits/32, N\]"),
        (lambda: unpack_gptq(QW.numpy(), 4, 32), TypeError, "qweight must be a torch.Tensor"),
        # zeros / qzeros
        (lambda: pack_gptq_zeros(torch.ones(32, 2), 4), TypeError, "zeros must be an integer tensor"),
        (lambda: pack_gptq_zeros(torch.ones(32, dtype=torch.int64), 4), ValueError, r"zeros must be 2-D \[N, G\]"),
        (lambda: pack_gptq_zeros(torch.ones(12, 2, dtype=torch.int64), 4), ValueError,
         r"N \(zeros.shape\[0\]\) = 12 must be a multiple of 8 for bits=4"),
        (lambda: pack_gptq_zeros(torch.ones(16, 2, dtype=torch.int64), 3), ValueError,
         "= 16 must be a multiple of 32 for bits=3"),
        (lambda: pack_gptq_zeros(torch.full((8, 2), 16), 4, "gptq_v2"), ValueError, r"zeros must lie in \[0, 15\]"),
        (lambda: pack_gptq_zeros(torch.full((8, 2), -1), 4, "gptq_v2"), ValueError, r"zeros must lie in \[0, 15\]"),
        (lambda: pack_gptq_zeros(torch.full((8, 2), 16), 4, "gptq"), ValueError,
         r'zeros must lie in \[1, 15\] for bits=4 with checkpoint_format="gptq"'),
        (lambda: pack_gptq_zeros(torch.zeros(4, 1, dtype=torch.int64), 8, "gptq"), ValueError, "zero point of 0"),
        (lambda: pack_gptq_zeros(torch.ones(8, 1, dtype=torch.int64), 4, "gptq_v3"), ValueError,
         r"checkpoint_format must be one of \('gptq', 'gptq_v2'\), got 'gptq_v3'"),
        (lambda: unpack_gptq_zeros(QZ, 4, 32, "awq"), ValueError, "checkpoint_format must be one of"),
        (lambda: unpack_gptq_zeros(QZ, 4, 64), ValueError,
         r"qzeros must have N·bits/32 = 64·4/32 = 8 columns for N = 64, got shape \(2, 4\)"),
        (lambda: unpack_gptq_zeros(QZ, 4, 12), ValueError, "N = 12 must be a multiple of 8 for bits=4"),
        (lambda: unpack_gptq_zeros(QZ.long(), 4, 32), TypeError, "qzeros must be an int32 tensor"),
        (lambda: unpack_gptq_zeros(QZ.flatten(), 4, 32), ValueError, r"qzeros must be 2-D \[G, N·bits/32\]"),
        # scales
        (lambda: pack_scales(torch.ones(4, 2, dtype=torch.int32)), TypeError, "scales must be a floating-point"),
        (lambda: pack_scales(torch.ones(4)), ValueError, r"scales must be 2-D \[N, G\]"),
        (lambda: pack_scales(torch.tensor([[1.0, float("nan")]])), ValueError, "scales contains NaN or Inf"),
        (lambda: pack_scales(torch.tensor([[1.0, float("inf")]])), ValueError, "scales contains NaN or Inf"),
        (lambda: pack_scales(torch.tensor([[1.0, -1e5]])), ValueError, "scales overflow float16.*100000"),
        (lambda: pack_scales(torch.tensor([[1.0, 1e-9]])), ValueError, "scales underflow float16"),
        (lambda: pack_scales(1.0), TypeError, "scales must be a torch.Tensor"),
        (lambda: unpack_scales(torch.ones(4, 2, dtype=torch.int32)), TypeError, "scales_ckpt must be a floating-point"),
        (lambda: unpack_scales(torch.ones(4)), ValueError, r"scales_ckpt must be 2-D \[G, N\]"),
        # dequantize
        (lambda: dequantize_gptq(QW, SC, QZ, GI.float(), 4), TypeError, "g_idx must be an integer tensor"),
        (lambda: dequantize_gptq(QW, SC, QZ, GI[None], 4), ValueError, r"g_idx must be 1-D \[K\]"),
        (lambda: dequantize_gptq(QW, SC, QZ, GI[:16], 4), ValueError,
         "qweight must have K·bits/32 = 16·4/32 = 2 rows for K = 16"),
        (lambda: dequantize_gptq(QW, SC, QZ, GI + 1, 4), ValueError,
         r"g_idx must lie in \[0, G − 1\] = \[0, 1\], got values in \[1, 2\]"),
        (lambda: dequantize_gptq(QW, SC, QZ, GI - 1, 4), ValueError, r"g_idx must lie in \[0, G − 1\]"),
        (lambda: dequantize_gptq(QW, SC[:, :16], QZ, GI, 4), ValueError,
         r"scales must be \[G, N\] with N = qweight.shape\[1\] = 32"),
        (lambda: dequantize_gptq(QW, SC.int(), QZ, GI, 4), TypeError, "scales must be a floating-point"),
        (lambda: dequantize_gptq(QW, SC, QZ[:1], GI, 4), ValueError, "qzeros has 1 group rows but scales has G = 2"),
        (lambda: dequantize_gptq(QW, SC, QZ[:, :2], GI, 4), ValueError, "qzeros must have N·bits/32"),
        (lambda: dequantize_gptq(QW, SC, QZ, GI, 4, "v1"), ValueError, "checkpoint_format must be one of"),
        (lambda: dequantize_gptq(QW.long(), SC, QZ, GI, 4), TypeError, "qweight must be an int32 tensor"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_keeps_good_ckpt_valid():
    # the fixtures above are themselves valid
    assert dequantize_gptq(QW, SC, QZ, GI, 4).shape == (32, 32)


def test_all_ones_v1_zero_field_reads_as_the_format_defines_and_warns_once(monkeypatch):
    import maca_kernels.formats.gptq as fmt

    monkeypatch.setattr(fmt, "_WARNED_ALL_ONES", False)
    qzeros = torch.full((2, 1), -1, dtype=torch.int32)  # every 4-bit field all ones
    with pytest.warns(UserWarning, match="all ones"):
        z = unpack_gptq_zeros(qzeros, 4, 8, checkpoint_format="gptq")
    assert (z == 16).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unpack_gptq_zeros(qzeros, 4, 8, checkpoint_format="gptq")  # once per process
