"""Calibration sets: random, non-overlapping windows of one token stream, fixed-length or multi-scale (MaCa).

``fixed`` draws windows of one length; ``matryoshka`` draws windows of several lengths (by default an equal
token budget per length). Both spend the same ``total_tokens`` so a comparison between them is fair.

Budget rounding: every calibration uses ``T`` tokens with ``total_tokens − longest < T ≤ total_tokens``, where
``longest`` is its longest sequence length. ``fixed`` floors to whole sequences (``T = (total_tokens // seq_len)
· seq_len``); ``matryoshka`` with ``split="tokens"`` gives each length ``total_tokens // (k · L)`` sequences,
then spends the remainder one sequence at a time (on the fitting length furthest below its share) until less
than ``min(lengths)`` is left, so per-length token shares differ by at most ``max(lengths)``; with
``split="count"`` each length gets ``n = total_tokens // sum(lengths)`` sequences, plus one for the longest
lengths that still fit (counts differ by at most one). With ``seq_len == max(lengths)`` the two schemes thus
differ by less than one longest length; when ``total_tokens`` is a multiple of ``k · max(lengths)``
(powers-of-two lengths, split="tokens") both use it exactly.

Contract with the Hessian: ``calib.input_ids`` holds the sequences back to back in the order of
``calib.lengths``, so the activations ``x [calib.total_tokens, d]`` of a model run on those sequences feed
``accumulate_hessian(x, calib.lengths)`` directly.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from dataclasses import dataclass

import torch

SCHEMES = ("fixed", "matryoshka")
SPLITS = ("tokens", "count")


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make the generated __eq__ ambiguous
class Calibration:
    """Calibration sequences cut from one token stream.

    ``input_ids[sum(lengths[:i]) : sum(lengths[:i+1])] == source[starts[i] : starts[i] + lengths[i]]``;
    windows are listed in ascending ``starts`` order and never overlap.
    """

    input_ids: torch.Tensor  # int64 [T]: the sequences back to back
    lengths: torch.Tensor  # int64 [S]: sequence lengths, sum == T
    starts: torch.Tensor  # int64 [S]: where each window starts in the source token stream
    scheme: str  # "fixed" | "matryoshka"
    seed: int
    source_tokens: int  # length of the token stream the windows were drawn from
    split: str | None = None  # matryoshka budget split ("tokens" | "count"); None for fixed

    def __post_init__(self):
        # Checked here too, so a hand-built Calibration cannot break the Hessian contract.
        for name in ("input_ids", "lengths", "starts"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"Calibration.{name} must be a 1-D int64 tensor")
        if self.lengths.numel() != self.starts.numel() or self.lengths.numel() == 0:
            raise ValueError("Calibration.lengths and .starts must be non-empty and of equal size")
        if int(self.lengths.min()) <= 0 or int(self.lengths.sum()) != self.input_ids.numel():
            raise ValueError("Calibration.lengths must be positive and sum to input_ids.numel()")
        if self.scheme not in SCHEMES:
            raise ValueError(f"Calibration.scheme must be one of {SCHEMES}, got {self.scheme!r}")

    @property
    def total_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def n_sequences(self) -> int:
        return self.lengths.numel()

    def sequences(self) -> list[torch.Tensor]:
        """The sequences as 1-D views of ``input_ids``, in ``lengths`` order."""
        return list(self.input_ids.split(self.lengths.tolist()))

    def to_records(self) -> list[dict]:
        """``[{"input_ids": [...], "attention_mask": [1, ...]}]``, one per sequence: the calibration argument of
        GPTQModel's ``quantize`` as is, and of llm-compressor's ``oneshot`` as ``datasets.Dataset.from_list``.
        Feed them unpadded and untruncated (GPTQModel: ``calibration_concat_size=None,
        calibration_data_min_length=0``; llm-compressor: ``batch_size=1``, ``max_seq_length`` ≥ the longest)
        so that each sequence stays one sample for ``weighting="sequence"``."""
        return [{"input_ids": s.tolist(), "attention_mask": [1] * s.numel()} for s in self.sequences()]

    def by_length(self) -> dict[int, torch.Tensor]:
        """``{L: LongTensor [n_L, L]}`` in ascending L, rows in ``lengths`` order: one unpadded batch per length."""
        seqs = self.sequences()
        groups: dict[int, list[torch.Tensor]] = {}
        for s in seqs:
            groups.setdefault(s.numel(), []).append(s)
        return {n: torch.stack(groups[n]) for n in sorted(groups)}

    def describe(self) -> dict:
        """JSON-ready summary for checkpoint metadata: scheme, split, seed, length histogram, token counts."""
        hist = Counter(self.lengths.tolist())
        return {
            "scheme": self.scheme,
            "split": self.split,
            "seed": self.seed,
            "lengths": {str(n): hist[n] for n in sorted(hist)},
            "n_sequences": self.n_sequences,
            "total_tokens": self.total_tokens,
            "source_tokens": self.source_tokens,
        }

    def covered(self) -> torch.Tensor:
        """Bool mask ``[source_tokens]``: True at the source positions some window uses."""
        mask = torch.zeros(self.source_tokens, dtype=torch.bool)
        mask[_window_index(self.starts, self.lengths)] = True
        return mask


# ---------------------------------------------------------------------------------------------- sampling


def fixed(
    token_ids: torch.Tensor,
    seq_len: int = 2048,
    *,
    total_tokens: int,
    seed: int = 0,
    max_positions: int | None = None,
) -> Calibration:
    """``total_tokens // seq_len`` random non-overlapping windows of ``seq_len`` tokens."""
    ids = _check_token_ids(token_ids)
    (seq_len,) = _check_lengths((seq_len,), "seq_len", max_positions)
    total_tokens = _check_positive_int(total_tokens, "total_tokens")
    seed = _check_seed(seed)
    n = total_tokens // seq_len
    if n == 0:
        raise ValueError(f"total_tokens={total_tokens} is less than one sequence of seq_len={seq_len}")
    return _draw(ids, [seq_len] * n, "fixed", seed, None)


def matryoshka(
    token_ids: torch.Tensor,
    lengths=(128, 512, 1024, 2048),
    *,
    total_tokens: int,
    seed: int = 0,
    split: str = "tokens",
    max_positions: int | None = None,
) -> Calibration:
    """Random non-overlapping windows of several lengths: equal tokens (``split="tokens"``, within one longest
    length) or equal sequence counts (``split="count"``, within one) per length."""
    ids = _check_token_ids(token_ids)
    lens = sorted(_check_lengths(lengths, "lengths", max_positions))
    total_tokens = _check_positive_int(total_tokens, "total_tokens")
    seed = _check_seed(seed)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    counts = _matryoshka_counts(lens, total_tokens, split)
    missing = [n for n, c in zip(lens, counts, strict=True) if c == 0]
    if missing:
        need = len(lens) * lens[-1] if split == "tokens" else sum(lens)
        raise ValueError(
            f"total_tokens={total_tokens} gives no sequence of length {missing} with split={split!r}; "
            f"use total_tokens >= {need}"
        )
    return _draw(ids, [n for n, c in zip(lens, counts, strict=True) for _ in range(c)], "matryoshka", seed, split)


def _matryoshka_counts(lens: list[int], total: int, split: str) -> list[int]:
    """Sequences per length (``lens`` ascending); the total never exceeds ``total`` nor falls ``max(lens)`` short."""
    k = len(lens)
    if split == "count":
        # n or n + 1 of each length: the +1 goes to the longest lengths that still fit, longest first
        counts = [total // sum(lens)] * k
        left = total - counts[0] * sum(lens)
        for i in reversed(range(k)):
            if lens[i] <= left:
                counts[i] += 1
                left -= lens[i]
        return counts
    # "tokens": floor to the even share, then spend the remainder one sequence at a time on the fitting length
    # furthest below its share (ties: the longer one) until less than min(lens) is left
    counts = [total // (k * n) for n in lens]
    left = total - sum(c * n for c, n in zip(counts, lens, strict=True))
    while fit := [i for i, n in enumerate(lens) if n <= left]:
        i = min(fit, key=lambda i: (counts[i] * lens[i], -lens[i]))
        counts[i] += 1
        left -= lens[i]
    return counts


def _draw(ids: torch.Tensor, seq_lens: list[int], scheme: str, seed: int, split: str | None) -> Calibration:
    """Place the windows uniformly at random without overlap.

    Shuffle the window order, then split the ``N − T`` unused tokens into ``S + 1`` gaps by a uniform
    composition (stars and bars: ``S`` distinct bar positions among ``N − T + S``). Every non-overlapping
    layout is equally likely, placement cannot fail when ``T ≤ N``, and the cost is O(S), not O(N).
    """
    n_src, total, s = ids.numel(), sum(seq_lens), len(seq_lens)
    if total > n_src:
        raise ValueError(
            f"token_ids has {n_src} tokens but {s} non-overlapping windows need {total} "
            f"({_summary(seq_lens)}); give more text or lower total_tokens"
        )
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(seq_lens, dtype=torch.int64)[torch.randperm(s, generator=g)]
    bars = _distinct_sorted(n_src - total + s, s, g)
    # start_i = (tokens of windows before i) + (gap tokens before i) = cumsum_excl(lens)_i + bars_i − i
    starts = torch.cumsum(lens, 0) - lens + bars - torch.arange(s)
    return Calibration(ids[_window_index(starts, lens)], lens, starts, scheme, seed, n_src, split)


def _distinct_sorted(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct integers drawn uniformly from ``range(m)``, sorted (Floyd's algorithm, O(k))."""
    u = torch.rand(k, generator=g, dtype=torch.float64).tolist()
    chosen: set[int] = set()
    for u_i, j in zip(u, range(m - k, m), strict=True):
        t = min(int(u_i * (j + 1)), j)
        chosen.add(j if t in chosen else t)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def _window_index(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Source positions of all windows, back to back: ``cat(arange(s, s + n) for s, n)``."""
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.repeat_interleave(starts, lengths) + offsets


def _summary(seq_lens: list[int]) -> str:
    hist = Counter(seq_lens)
    return ", ".join(f"{hist[n]}×{n}" for n in sorted(hist))


# ---------------------------------------------------------------------------------------------- text


def load_token_ids(source=None, tokenizer=None, *, text: str | None = None, column: str = "text") -> torch.Tensor:
    """Tokenize one text into a 1-D int64 stream: ``source`` is a path to a plain or ``.gz`` UTF-8 file or a
    Hugging Face ``Dataset`` (rows of ``column`` joined by blank lines); raw text goes in ``text=``."""
    if tokenizer is None:
        raise ValueError("tokenizer is required")
    if (source is None) == (text is None):
        raise ValueError("give exactly one of source (a file path or a Dataset) and text=")
    if text is None:
        text = _read_source(source, column)
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    ids = _encode(tokenizer, text)
    if ids.numel() == 0:
        raise ValueError("the text tokenized to zero tokens")
    return ids


def read_text(path) -> str:
    """A plain or ``.gz`` UTF-8 text file; ValueError naming the file if it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source={path[:80]!r} is not a file (pass raw text as text=...)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start} of "
                         "the decoded stream)") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .gz file ({e})") from None


def _read_source(source, column: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return read_text(source)
    # Duck-typed so `datasets` stays optional: a Dataset exposes column_names and ds[column] -> list[str].
    names = getattr(source, "column_names", None)
    if names is None:
        raise ValueError(f"source must be a file path or a datasets.Dataset, got {type(source).__name__}")
    if column not in names:
        raise ValueError(f"source has no column {column!r} (columns: {list(names)})")
    return "\n\n".join(source[column])


def _encode(tokenizer, text: str) -> torch.Tensor:
    # HF convention first (no BOS/EOS: the windows are cut from the middle of the stream anyway).
    if callable(tokenizer):
        out = tokenizer(text, add_special_tokens=False)
        ids = out["input_ids"] if not isinstance(out, (list, torch.Tensor)) else out
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise ValueError("tokenizer must be callable (Hugging Face style) or have an encode method")
    ids = torch.as_tensor(ids, dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"tokenizer returned shape {tuple(ids.shape)}, expected one flat list of ids")
    return ids


def holdout_split(
    token_ids: torch.Tensor, *, eval_fraction: float | None = 0.1, eval_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calib_ids, eval_ids)``: the stream's tail (``eval_tokens``, else ``eval_fraction`` of it, rounded
    down) is held out for evaluation; one contiguous cut, so no calibration window can touch evaluation text."""
    ids = _check_token_ids(token_ids)
    n = ids.numel()
    if eval_tokens is not None:
        k = _check_positive_int(eval_tokens, "eval_tokens")
    else:
        if not isinstance(eval_fraction, (int, float)) or isinstance(eval_fraction, bool) or not (
            0 < eval_fraction < 1
        ):
            raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
        k = int(n * eval_fraction)
    if not 0 < k < n:
        raise ValueError(f"the held-out part must leave both sides non-empty: {k} of {n} tokens requested")
    return ids[: n - k], ids[n - k :]


# ---------------------------------------------------------------------------------------------- checks


def _check_token_ids(token_ids) -> torch.Tensor:
    if (
        not isinstance(token_ids, torch.Tensor)
        or token_ids.dim() != 1
        or token_ids.dtype == torch.bool
        or token_ids.is_floating_point()
        or token_ids.is_complex()
    ):
        what = f"{token_ids.dtype} {tuple(token_ids.shape)}" if isinstance(token_ids, torch.Tensor) else type(
            token_ids
        ).__name__
        raise ValueError(f"token_ids must be a 1-D integer tensor, got {what}")
    return token_ids.detach().to("cpu", torch.int64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_positive_int(v, name: str) -> int:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_seed(seed) -> int:
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def _check_lengths(lengths, name: str, max_positions: int | None) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    lens = [lengths] if _is_int(lengths) else list(lengths)
    if not lens:
        raise ValueError(f"{name} must not be empty")
    bad = [v for v in lens if not _is_int(v) or v <= 0]
    if bad:
        raise ValueError(f"{name} must be positive ints, got {bad}")
    dup = sorted(v for v, c in Counter(lens).items() if c > 1)
    if dup:
        raise ValueError(f"{name} has duplicates: {dup}")
    if max_positions is not None:
        _check_positive_int(max_positions, "max_positions")
        over = [v for v in lens if v > max_positions]
        if over:
            raise ValueError(f"{name} {over} exceed the model's max_positions={max_positions}")
    return lens


__all__ = ["Calibration", "fixed", "holdout_split", "load_token_ids", "matryoshka"]
