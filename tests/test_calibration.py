"""Calibration sets: equal budgets, determinism, non-overlap, grouping, loading, hold-out, Hessian contract."""

from __future__ import annotations

import gzip

import pytest
import torch
from helpers import gram64

from maca_kernels import accumulate_hessian
from maca_kernels.calibration import Calibration, fixed, holdout_split, load_token_ids, matryoshka

LENS = (128, 512, 1024, 2048)


def stream(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50_000, (n,), generator=torch.Generator().manual_seed(seed))


def check_windows(calib: Calibration, ids: torch.Tensor) -> None:
    """Windows lie inside the stream, never overlap, and input_ids is their content in lengths order."""
    starts, lens = calib.starts, calib.lengths
    assert calib.source_tokens == ids.numel() and int(lens.sum()) == calib.total_tokens
    assert int(starts.min()) >= 0 and int((starts + lens).max()) <= ids.numel()
    assert torch.all(starts[1:] >= starts[:-1] + lens[:-1])  # ascending and disjoint
    assert int(calib.covered().sum()) == calib.total_tokens
    for seq, s, n in zip(calib.sequences(), starts.tolist(), lens.tolist(), strict=True):
        assert torch.equal(seq, ids[s : s + n])


@pytest.mark.parametrize("total", [8192 * 7, 100_000, 65_537, 3 * 8192 + 5000])
def test_budgets_equal_across_schemes(total):
    ids = stream()
    f = fixed(ids, 2048, total_tokens=total)
    m = matryoshka(ids, LENS, total_tokens=total)
    c = matryoshka(ids, LENS, total_tokens=total, split="count")
    assert total - 2048 < f.total_tokens <= total
    assert total - 128 < m.total_tokens <= total and total - 2048 < c.total_tokens <= total
    assert abs(f.total_tokens - m.total_tokens) < 2048 and abs(f.total_tokens - c.total_tokens) < 2048
    if total % (len(LENS) * 2048) == 0:  # documented: exact budgets for multiples of k·max(lengths)
        assert f.total_tokens == m.total_tokens == total
    # split="tokens": each length's token share within one longest length of the even share
    shares = {n: n * len(v) for n, v in m.by_length().items()}
    assert set(shares) == set(LENS)
    assert max(shares.values()) - min(shares.values()) <= 2048


@pytest.mark.parametrize("total", [50_000, 65_536, 17 * 3712 + 2047, 17 * 3712 + 3711, 17 * 3712])
def test_split_count_gives_equal_counts(total):
    c = matryoshka(stream(), LENS, total_tokens=total, split="count")
    counts = [len(v) for v in c.by_length().values()]
    assert max(counts) - min(counts) <= 1 and min(counts) == total // sum(LENS)
    assert total - 2048 < c.total_tokens <= total
    assert c.describe()["split"] == "count"


@pytest.mark.parametrize("make", [
    lambda ids, seed: fixed(ids, 512, total_tokens=20_000, seed=seed),
    lambda ids, seed: matryoshka(ids, LENS, total_tokens=40_000, seed=seed),
])
def test_deterministic_per_seed(make):
    ids = stream()
    a, b, c = make(ids, 3), make(ids, 3), make(ids, 4)
    for name in ("input_ids", "lengths", "starts"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.starts, c.starts)
    check_windows(a, ids)
    check_windows(c, ids)


@pytest.mark.parametrize("seed", range(5))
def test_windows_disjoint_even_when_tight(seed):
    # the budget fills the whole stream, or all but a few tokens: placement must still succeed
    ids = stream(4 * 8192 + 3)
    check_windows(matryoshka(ids, LENS, total_tokens=ids.numel(), seed=seed), ids)
    ids = stream(10 * 512)
    check_windows(fixed(ids, 512, total_tokens=ids.numel(), seed=seed), ids)


def test_windows_spread_over_stream():
    ids = stream(1_000_000)
    calib = fixed(ids, 2048, total_tokens=100 * 2048, seed=0)
    check_windows(calib, ids)
    # a uniform layout reaches both ends of the stream, not just its first T tokens
    assert int(calib.starts[0]) < 50_000 and int(calib.starts[-1]) > 900_000


def test_by_length_round_trip_and_describe():
    ids = stream()
    calib = matryoshka(ids, (64, 16, 256), total_tokens=10_000, seed=1)
    groups = calib.by_length()
    assert list(groups) == [16, 64, 256]  # ascending lengths
    rebuilt = {n: iter(g) for n, g in groups.items()}
    for seq in calib.sequences():  # rows keep lengths order within each group
        assert torch.equal(next(rebuilt[seq.numel()]), seq)
    assert all(g.dtype == torch.int64 and g.shape[1] == n for n, g in groups.items())
    d = calib.describe()
    assert d["scheme"] == "matryoshka" and d["seed"] == 1 and d["total_tokens"] == calib.total_tokens
    assert d["lengths"] == {str(n): len(g) for n, g in groups.items()}
    assert d["source_tokens"] == ids.numel() and d["n_sequences"] == calib.n_sequences


def test_hessian_contract():
    ids = stream(30_000) % 1000
    emb = torch.randn(1000, 24, generator=torch.Generator().manual_seed(0))
    calib = matryoshka(ids, (32, 64, 128), total_tokens=3000, seed=2)
    x = emb[calib.input_ids]
    assert x.shape[0] == calib.total_tokens
    want = torch.zeros(24, 24, dtype=torch.float64)
    for seq in calib.sequences():
        xs = emb[seq].double()
        want += xs.T @ xs / seq.numel()
    assert torch.allclose(gram64(x, calib.lengths), want)
    got = accumulate_hessian(x, calib.lengths)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("call, match", [
    (lambda ids: fixed(ids, 2048, total_tokens=20 * 2048), r"has 10000 tokens but 20 non-overlapping .* need 40960"),
    (lambda ids: matryoshka(ids, LENS, total_tokens=20_000),
     r"has 10000 tokens but 56 non-overlapping windows need 19968 \(40×128, 9×512, 4×1024, 3×2048\)"),
    (lambda ids: fixed(ids, 4096, total_tokens=4096, max_positions=2048), r"seq_len \[4096\].*max_positions=2048"),
    (lambda ids: matryoshka(ids, LENS, total_tokens=8192, max_positions=1024), r"lengths \[2048\].*max_positions"),
    (lambda ids: matryoshka(ids, (), total_tokens=100), r"lengths must not be empty"),
    (lambda ids: matryoshka(ids, (0, 16), total_tokens=100), r"lengths must be positive"),
    (lambda ids: matryoshka(ids, (-4, 16), total_tokens=100), r"lengths must be positive"),
    (lambda ids: fixed(ids, 0, total_tokens=100), r"seq_len must be positive"),
    (lambda ids: matryoshka(ids, (16, 32, 16), total_tokens=100), r"lengths has duplicates: \[16\]"),
    (lambda ids: matryoshka(ids, (16, 32), total_tokens=0), r"total_tokens must be a positive int"),
    (lambda ids: fixed(ids, 16, total_tokens=-5), r"total_tokens must be a positive int"),
    (lambda ids: fixed(ids, 16, total_tokens=10), r"total_tokens=10 is less than one sequence"),
    (lambda ids: matryoshka(ids, (16, 32), total_tokens=100, split="len"), r"split must be one of"),
    (lambda ids: matryoshka(ids, LENS, total_tokens=4096), r"no sequence of length \[2048\].*>= 8192"),
    (lambda ids: matryoshka(ids, LENS, total_tokens=3000, split="count"), r"no sequence.*>= 3712"),
    (lambda ids: fixed(ids, 16, total_tokens=64, seed=1.5), r"seed must be an int"),
    (lambda ids: fixed(ids.float(), 16, total_tokens=64), r"token_ids must be a 1-D integer tensor"),
    (lambda ids: fixed(ids.view(100, 100), 16, total_tokens=64), r"token_ids must be a 1-D integer tensor"),
    (lambda ids: fixed(ids.tolist(), 16, total_tokens=64), r"token_ids must be a 1-D integer tensor"),
    (lambda ids: fixed(ids > 0, 16, total_tokens=64), r"token_ids must be a 1-D integer tensor"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(stream(10_000))


def test_calibration_checks_its_invariants():
    with pytest.raises(ValueError, match="sum to input_ids"):
        Calibration(torch.zeros(10, dtype=torch.int64), torch.tensor([4, 5]), torch.tensor([0, 4]), "fixed", 0, 10)


class EncodeTok:
    """Stand-in with only ``encode``: one id per character."""

    def encode(self, text):
        return [ord(ch) for ch in text]


class HFTok(EncodeTok):
    """Stand-in for the Hugging Face call convention; special tokens must be switched off."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + self.encode(text)}


class FakeDataset:
    column_names = ["text", "meta"]

    def __getitem__(self, column):
        return ["ab", "cd"] if column == "text" else [0, 1]


@pytest.mark.parametrize("tok", [EncodeTok(), HFTok()])
def test_load_token_ids(tmp_path, tok):
    text = "hello, calibration\nsecond line é"
    want = torch.tensor([ord(c) for c in text])
    plain, gz = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_text(text, encoding="utf-8")
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text)
    for source in (plain, str(plain), str(gz)):
        got = load_token_ids(source, tok)
        assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(load_token_ids(text=text, tokenizer=tok), want)
    assert torch.equal(load_token_ids(FakeDataset(), tok), torch.tensor([ord(c) for c in "ab\n\ncd"]))


def test_load_token_ids_errors(tmp_path):
    tok = EncodeTok()
    with pytest.raises(FileNotFoundError, match="text="):
        load_token_ids("just some text", tok)
    with pytest.raises(ValueError, match="exactly one"):
        load_token_ids(tmp_path / "x", tok, text="x")
    with pytest.raises(ValueError, match="exactly one"):
        load_token_ids(None, tok)
    with pytest.raises(ValueError, match="tokenizer is required"):
        load_token_ids(text="x")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_token_ids(FakeDataset(), tok, column="body")
    with pytest.raises(ValueError, match="zero tokens"):
        load_token_ids(text="", tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer must be callable"):
        load_token_ids(text="x", tokenizer=object())


def test_holdout_split_no_overlap():
    ids = torch.arange(10_000)
    calib_ids, eval_ids = holdout_split(ids, eval_fraction=0.1)
    assert calib_ids.numel() == 9000 and eval_ids.numel() == 1000
    assert torch.equal(torch.cat([calib_ids, eval_ids]), ids)
    c = matryoshka(calib_ids, (64, 128), total_tokens=4000, seed=0)
    assert int((c.starts + c.lengths).max()) <= calib_ids.numel()  # windows end before the held-out text
    assert not set(c.input_ids.tolist()) & set(eval_ids.tolist())
    a, b = holdout_split(ids, eval_tokens=123)
    assert b.numel() == 123 and torch.equal(b, ids[-123:]) and a.numel() == 10_000 - 123
    for kwargs, match in [
        ({"eval_fraction": 0.0}, "eval_fraction"),
        ({"eval_fraction": 1.5}, "eval_fraction"),
        ({"eval_tokens": 0}, "eval_tokens"),
        ({"eval_tokens": 10_000}, "non-empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            holdout_split(ids, **kwargs)


def test_records_for_other_tools_are_the_sequences():
    ids = stream(50_000, seed=3)
    calib = matryoshka(ids, lengths=(128, 512), total_tokens=4096, seed=1)
    records = calib.to_records()
    assert len(records) == calib.n_sequences
    for rec, seq in zip(records, calib.sequences(), strict=True):
        assert rec["input_ids"] == seq.tolist() and rec["attention_mask"] == [1] * seq.numel()
    assert sorted(len(r["input_ids"]) for r in records) == sorted(calib.lengths.tolist())
