"""Stateful Hessian accumulation for calibration: feed activations batch by batch (e.g. from forward
hooks), merge partial accumulators (also across ``torch.distributed`` ranks), finalize to the mean."""

from __future__ import annotations

import torch

from . import _check_out, gram_from_plan
from .plan import WEIGHTINGS, make_plan


class HessianAccumulator:
    """Running ``Σ w XᵀX`` (and optionally the GPTAQ cross term ``Σ w ΔXᵀX``) for one layer input.

    ``weighting="sequence"`` (MaCa) weights each sequence by ``1/n_s``; ``"token"`` weights every token 1.
    ``finalize()`` returns the mean Hessian in the GPTQ convention ``2/N · Σ`` with N the number of
    sequences ("sequence") or tokens ("token").
    """

    def __init__(
        self,
        d: int,
        *,
        weighting: str = "sequence",
        cross_term: bool = False,
        device: torch.device | str | None = None,
        check_finite: bool = True,
        backend: str | None = None,
        deterministic: bool = False,
    ) -> None:
        if not isinstance(d, int) or d <= 0:
            raise ValueError(f"d must be a positive int (the hidden size), got {d!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.d = d
        self.weighting = weighting
        self.check_finite = check_finite
        self.backend = backend
        self.deterministic = deterministic
        self.H = torch.zeros(d, d, dtype=torch.float32, device=device)
        self.dXXt = torch.zeros_like(self.H) if cross_term else None
        self.n_sequences = 0
        self.n_tokens = 0

    @property
    def cross_term(self) -> bool:
        return self.dXXt is not None

    @property
    def n_samples(self) -> int:
        """N of the ``2/N`` normalisation: sequences for MaCa weighting, tokens for token weighting."""
        return self.n_sequences if self.weighting == "sequence" else self.n_tokens

    def add(
        self,
        x: torch.Tensor,
        lengths=None,
        *,
        attention_mask: torch.Tensor | None = None,
        x_fp: torch.Tensor | None = None,
    ) -> HessianAccumulator:
        """Add a batch. ``x`` is the layer input seen by the (partly) quantized model; ``x_fp`` the
        full-precision model's input to the same layer (GPTAQ cross term, needs ``cross_term=True``)."""
        if x_fp is not None and not self.cross_term:
            raise ValueError("x_fp was given but this accumulator was built with cross_term=False")
        if self.cross_term and x_fp is None:
            raise ValueError("this accumulator tracks the GPTAQ cross term: pass x_fp (full-precision input)")
        plan = make_plan(
            x, lengths, attention_mask=attention_mask, weighting=self.weighting, x_fp=x_fp,
            check_finite=self.check_finite,
        )
        _check_out(self.H, plan.d, x.device)
        opts = dict(weighting=self.weighting, backend=self.backend, deterministic=self.deterministic)
        gram_from_plan(plan, self.H, **opts)
        if self.cross_term:
            gram_from_plan(plan, self.dXXt, cross=True, **opts)
        self.n_sequences += plan.n_sequences
        self.n_tokens += plan.n_tokens
        return self

    def _check_compatible(self, other: HessianAccumulator) -> None:
        if not isinstance(other, HessianAccumulator):
            raise TypeError(f"can only merge a HessianAccumulator, got {type(other).__name__}")
        mine = (self.d, self.weighting, self.cross_term)
        theirs = (other.d, other.weighting, other.cross_term)
        if mine != theirs:
            raise ValueError(f"cannot merge accumulators with (d, weighting, cross_term) {theirs} into {mine}")

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Add another accumulator's sums and counts into this one (e.g. from another data shard)."""
        self._check_compatible(other)
        self.H += other.H.to(self.H.device)
        if self.cross_term:
            self.dXXt += other.dXXt.to(self.H.device)
        self.n_sequences += other.n_sequences
        self.n_tokens += other.n_tokens
        return self

    def all_reduce(self, group=None) -> HessianAccumulator:
        """Sum sums and counts over the ranks of ``group`` (every rank ends with the global total).
        Without an initialised process group this is a world of one: nothing to do."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self

        counts = torch.tensor([self.n_sequences, self.n_tokens], dtype=torch.int64, device=self.H.device)
        dist.all_reduce(self.H, group=group)
        if self.cross_term:
            dist.all_reduce(self.dXXt, group=group)
        dist.all_reduce(counts, group=group)
        self.n_sequences, self.n_tokens = (int(v) for v in counts.tolist())
        return self

    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        if self.n_samples == 0:
            raise RuntimeError("finalize() on an empty HessianAccumulator: add() some activations first")
        return total * (2.0 / self.n_samples)

    def finalize(self) -> torch.Tensor:
        """Mean Hessian ``2/N · Σ w XᵀX`` (a new tensor; the accumulator keeps its sums)."""
        return self._mean(self.H)

    def finalize_cross(self) -> torch.Tensor:
        """Mean GPTAQ cross term ``2/N · Σ w ΔXᵀX`` with ``ΔX = X_fp − X``."""
        if not self.cross_term:
            raise RuntimeError("this accumulator was built with cross_term=False")
        return self._mean(self.dXXt)
