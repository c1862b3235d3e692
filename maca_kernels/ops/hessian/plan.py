"""Input validation and the "run" plan shared by every Hessian kernel.

Whatever form the user passes (packed ``[T, d]`` + lengths, padded ``[B, L, d]`` + mask or lengths),
it is reduced to a 2-D row view of ``x`` plus *runs*: contiguous row ranges with one weight each.
Since ``Σ_s w_s X_sᵀ X_s = Σ_t w(t) x_t x_tᵀ``, the kernels only need a per-row weight; they apply it
to fp32 partial sums whenever it changes. Adjacent runs with the same weight are merged, so a
packed batch of equal-length sequences (or token weighting) is a single run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WEIGHTINGS = ("sequence", "token")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class GramPlan:
    x: torch.Tensor  # [R, d], unit stride inside a row
    x_fp: torch.Tensor | None  # same layout as x (GPTAQ cross term), or None
    run_start: torch.Tensor  # int64 [n_runs], CPU: first row of each run
    run_len: torch.Tensor  # int64 [n_runs], CPU
    run_weight: torch.Tensor  # float32 [n_runs], CPU
    n_sequences: int
    n_tokens: int

    @property
    def d(self) -> int:
        return self.x.shape[1]


def _as_lengths(lengths, name: str = "lengths") -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one entry per sequence), got shape {tuple(lengths.shape)}")
        return lengths.detach().to("cpu", torch.int64)
    if isinstance(lengths, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
        return torch.tensor(list(lengths), dtype=torch.int64)
    raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {type(lengths).__name__}")


def _check_positive(lengths: torch.Tensor, name: str) -> None:
    if lengths.numel() == 0:
        raise ValueError(f"{name} is empty: at least one sequence is needed")
    bad = (lengths <= 0).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{name}[{i}] = {int(lengths[i])}: every sequence needs at least one token")


def _check_finite(parts: list[torch.Tensor], name: str) -> None:
    # aminmax propagates NaN and exposes ±inf without materialising a [T, d] boolean mask; one sync.
    ends = torch.stack([torch.stack(torch.aminmax(p)) for p in parts if p.numel()])
    if not torch.isfinite(ends).all().item():
        raise ValueError(
            f"{name} contains NaN or Inf in a token that enters the Hessian "
            "(pass check_finite=False to skip this check)"
        )


def _merge_runs(start: torch.Tensor, length: torch.Tensor, weight: torch.Tensor):
    """Merge neighbouring runs that are contiguous in memory and share a weight."""
    if start.numel() <= 1:
        return start, length, weight
    joins = (start[1:] == start[:-1] + length[:-1]) & (weight[1:] == weight[:-1])
    group = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum((~joins).to(torch.int64), 0)])
    n = int(group[-1]) + 1
    first = torch.ones(start.numel(), dtype=torch.bool)
    first[1:] = ~joins
    merged_len = torch.zeros(n, dtype=torch.int64).index_add_(0, group, length)
    return start[first], merged_len, weight[first]


def _weights(n_tokens_per_seq: torch.Tensor, weighting: str) -> torch.Tensor:
    if weighting == "sequence":
        return (1.0 / n_tokens_per_seq.to(torch.float64)).to(torch.float32)
    return torch.ones(n_tokens_per_seq.numel(), dtype=torch.float32)


def _mask_runs(mask: torch.Tensor, L: int):
    """Runs of consecutive valid tokens of a [B, L] mask, in the flattened row numbering."""
    m = mask.to(torch.int8)
    pad = torch.zeros(m.shape[0], 1, dtype=torch.int8)
    edges = torch.diff(torch.cat([pad, m, pad], dim=1), dim=1)  # +1 at a run start, -1 one past its end
    b_start, p_start = (edges == 1).nonzero(as_tuple=True)
    _, p_end = (edges == -1).nonzero(as_tuple=True)  # row-major order pairs each end with its start
    return b_start, b_start * L + p_start, p_end - p_start


def make_plan(
    x: torch.Tensor,
    lengths=None,
    *,
    attention_mask: torch.Tensor | None = None,
    weighting: str = "sequence",
    x_fp: torch.Tensor | None = None,
    check_finite: bool = True,
) -> GramPlan:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be packed [T, d] or padded [B, L, d], got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("x has hidden size d = 0")
    if x_fp is not None:
        if not isinstance(x_fp, torch.Tensor) or x_fp.shape != x.shape or x_fp.dtype != x.dtype:
            got = (tuple(x_fp.shape), x_fp.dtype) if isinstance(x_fp, torch.Tensor) else type(x_fp).__name__
            raise ValueError(f"x_fp must match x in shape and dtype {tuple(x.shape), x.dtype}, got {got}")
        if x_fp.device != x.device:
            raise ValueError(f"x_fp is on {x_fp.device} but x is on {x.device}")

    d = x.shape[-1]
    if x.dim() == 2:
        if attention_mask is not None:
            raise ValueError("attention_mask is only for padded input x [B, L, d]; packed x [T, d] takes lengths")
        T = x.shape[0]
        if lengths is None:
            if weighting == "sequence":
                raise ValueError(
                    "lengths is required for packed x [T, d] with weighting='sequence' "
                    "(each sequence is one sample); pass lengths=[T] for a single sequence"
                )
            lengths = [T]
        n = _as_lengths(lengths)
        _check_positive(n, "lengths")
        if int(n.sum()) != T:
            raise ValueError(f"lengths sum to {int(n.sum())} but x has T = {T} tokens (rows)")
        start = torch.cumsum(n, 0) - n
        seq_len = n
        run_len, seq_of_run = n, torch.arange(n.numel())
        valid = None
    else:
        B, L, _ = x.shape
        if attention_mask is not None and lengths is not None:
            raise ValueError("pass either attention_mask or lengths for padded x [B, L, d], not both")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(f"attention_mask must have shape [B, L] = {(B, L)}, got {got}")
            mask = attention_mask.detach().cpu()
            if mask.dtype != torch.bool:
                if mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
                    raise ValueError("attention_mask must be boolean or hold only 0 and 1")
                mask = mask.bool()
            seq_len = mask.sum(dim=1)
            empty = (seq_len == 0).nonzero()
            if empty.numel():
                raise ValueError(f"attention_mask row {int(empty[0, 0])} has no valid token")
            seq_of_run, start, run_len = _mask_runs(mask, L)
            valid = mask
        else:
            if lengths is None:
                lengths = [L] * B
            seq_len = _as_lengths(lengths)
            if seq_len.numel() != B:
                raise ValueError(f"lengths must have one entry per batch row (B = {B}), got {seq_len.numel()}")
            _check_positive(seq_len, "lengths")
            too_long = (seq_len > L).nonzero()
            if too_long.numel():
                i = int(too_long[0, 0])
                raise ValueError(f"lengths[{i}] = {int(seq_len[i])} exceeds the padded length L = {L}")
            start = torch.arange(B, dtype=torch.int64) * L
            run_len, seq_of_run = seq_len, torch.arange(B)
            valid = None

    if check_finite:
        for name, t in (("x", x), ("x_fp", x_fp)):
            if t is None:
                continue
            if t.dim() == 2:
                parts = [t]
            elif valid is not None:  # attention mask: gather the valid tokens
                parts = [t[valid.to(t.device)]]
            else:  # valid prefixes: one slice per row, no copy
                parts = [t[b, :n] for b, n in enumerate(seq_len.tolist())]
            _check_finite(parts, name)

    x2 = x.reshape(-1, d)
    xf2 = None if x_fp is None else x_fp.reshape(-1, d)
    if x2.stride(1) != 1 or (xf2 is not None and xf2.stride() != x2.stride()):
        x2 = x2.contiguous()
        xf2 = None if xf2 is None else xf2.contiguous()

    weight = _weights(seq_len, weighting)[seq_of_run]
    run_start, run_len, run_weight = _merge_runs(start.to(torch.int64), run_len.to(torch.int64), weight)
    return GramPlan(x2, xf2, run_start, run_len, run_weight, int(seq_len.numel()), int(seq_len.sum()))
