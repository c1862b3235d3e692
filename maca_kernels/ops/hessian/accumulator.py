"""Stateful Hessian accumulation for calibration: feed activations batch by batch (e.g. from forward
hooks), merge partial accumulators (also across ``torch.distributed`` ranks), finalize to the mean."""

from __future__ import annotations

import torch

from . import _check_out, gram_from_plan, resolve_backend
from .plan import WEIGHTINGS, make_plan


class HessianAccumulator:
    """Running ``Σ w XᵀX`` (and optionally the GPTAQ cross term ``Σ w ΔXᵀX``) for one layer input.

    ``weighting="sequence"`` (MaCa) weights each sequence by ``1/n_s``; ``"token"`` weights every token 1.
    ``finalize()`` returns the mean Hessian in the GPTQ convention ``2/N · Σ`` with N the number of
    sequences ("sequence") or tokens ("token").

    On a GPU, ``add`` never waits for the device: the Triton kernel fills only the upper triangle of the
    running sum (mirrored once, when ``H`` is read), and NaN/Inf is caught where it must land, in the
    sums: a non-finite token value makes its diagonal entry of H (and its row of the cross term)
    non-finite, which ``finalize``/``merge``/``all_reduce`` check once (``check_finite=False`` skips it).
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
        self._H = torch.zeros(d, d, dtype=torch.float32, device=device)
        self._upper_only = False  # the lower triangle of _H is stale (the GPU kernel skips the mirror)
        self.dXXt = torch.zeros_like(self._H) if cross_term else None
        self._unchecked = False  # GPU adds since the last finiteness check of the sums
        self.n_sequences = 0
        self.n_tokens = 0

    @property
    def H(self) -> torch.Tensor:
        """The running sum ``Σ w XᵀX`` (symmetric, fp32 [d, d])."""
        if self._upper_only:
            upper = torch.triu(self._H)
            self._H.copy_(upper + torch.triu(upper, 1).T)
            self._upper_only = False
        return self._H

    def _check_deferred(self) -> None:
        if not self._unchecked:
            return
        ok = torch.isfinite(self._H.diagonal()).all()
        if self.cross_term:
            ok &= torch.isfinite(self.dXXt).all()
        if not ok.item():
            raise ValueError(
                "the accumulated Hessian is not finite: an earlier add() had NaN or Inf (or values whose "
                "squares overflow fp32) in a token that entered it (pass check_finite=False to skip this check)"
            )
        self._unchecked = False

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
        defer = self.check_finite and x.device.type == "cuda"  # checked on the sums: no sync, no extra pass
        plan = make_plan(
            x, lengths, attention_mask=attention_mask, weighting=self.weighting, x_fp=x_fp,
            check_finite=self.check_finite and not defer,
        )
        _check_out(self._H, plan.d, x.device)
        self._unchecked |= defer
        opts = dict(weighting=self.weighting, backend=self.backend, deterministic=self.deterministic)
        upper_only = resolve_backend(self.backend, x.device) == "triton"
        gram_from_plan(plan, self._H, upper_only=upper_only, **opts)
        self._upper_only |= upper_only
        if self.cross_term:
            gram_from_plan(plan, self.dXXt, cross=True, **opts)
        self.n_sequences += plan.n_sequences
        self.n_tokens += plan.n_tokens
        return self

    def sums(self) -> list[torch.Tensor]:
        """The running sums, checked finite: ``[Σ w XᵀX]``, and ``Σ w ΔXᵀX`` after it with the cross term. What a
        reduction of one's own takes (e.g. partial sums added in a fixed order across ranks)."""
        self._check_deferred()
        return [self.H] + ([self.dXXt] if self.cross_term else [])

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
        self._check_deferred()
        other._check_deferred()
        self.H.add_(other.H.to(self._H.device))
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

        self._check_deferred()
        counts = torch.tensor([self.n_sequences, self.n_tokens], dtype=torch.int64, device=self._H.device)
        dist.all_reduce(self.H, group=group)
        if self.cross_term:
            dist.all_reduce(self.dXXt, group=group)
        dist.all_reduce(counts, group=group)
        self.n_sequences, self.n_tokens = (int(v) for v in counts.tolist())
        return self

    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        if self.n_samples == 0:
            raise RuntimeError("finalize() on an empty HessianAccumulator: add() some activations first")
        self._check_deferred()
        return total * (2.0 / self.n_samples)

    def finalize(self) -> torch.Tensor:
        """Mean Hessian ``2/N · Σ w XᵀX`` (a new tensor; the accumulator keeps its sums)."""
        return self._mean(self.H)

    def finalize_cross(self) -> torch.Tensor:
        """Mean GPTAQ cross term ``2/N · Σ w ΔXᵀX`` with ``ΔX = X_fp − X``."""
        if not self.cross_term:
            raise RuntimeError("this accumulator was built with cross_term=False")
        return self._mean(self.dXXt)
