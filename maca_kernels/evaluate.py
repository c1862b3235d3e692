"""Perplexity on held-out text at several evaluation lengths: the same code for FP, RTN and GPTQ models."""

from __future__ import annotations

import math

import torch
from torch import nn


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping windows of ``seq_len`` tokens of ``token_ids``
    (1-D). Each window is scored on its own (no context from the previous one), all ``seq_len − 1``
    predictions per window; ``max_tokens`` caps the tokens used (whole windows, from the start). Windows
    run ``batch_tokens`` tokens at a time (the logits of a batch are ``batch_tokens × vocab`` floats)."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.dtype.is_floating_point:
        raise ValueError("token_ids must be a 1-D integer tensor")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int ≥ 2, got {seq_len!r}")
    limit = token_ids.numel() if max_tokens is None else min(max_tokens, token_ids.numel())
    n_windows = limit // seq_len
    if n_windows == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens (limit {limit}): too short for one window of "
                         f"seq_len = {seq_len}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len = {seq_len} exceeds the model's max_position_embeddings = {max_pos}")
    windows = token_ids[: n_windows * seq_len].view(n_windows, seq_len).long()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    batches = windows.split(max(1, batch_tokens // seq_len))
    if progress:
        try:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"ppl@{seq_len}", unit="batch", leave=False)
        except ImportError:
            pass
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum")
            nll += float(loss)
            count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def perplexities(model: nn.Module, token_ids: torch.Tensor, seq_lens=(128, 512, 2048), *, max_tokens: int | None = None,
                 batch_tokens: int = 4096, progress: bool = False) -> dict[int, float]:
    """``{seq_len: perplexity}`` on the same text for each evaluation length."""
    return {L: perplexity(model, token_ids, L, max_tokens=max_tokens, batch_tokens=batch_tokens, progress=progress)
            for L in seq_lens}
