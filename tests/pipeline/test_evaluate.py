"""Perplexity on non-overlapping windows, checked against a hand-written loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

from maca_kernels.evaluate import perplexities, perplexity  # noqa: E402


def test_matches_hand_loop():
    model = tiny_model(seed=5)
    ids = torch.randint(0, 96, (300,), generator=torch.Generator().manual_seed(6))
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(300 // 32):
            x = ids[w * 32 : (w + 1) * 32]
            logp = torch.log_softmax(model(x[None]).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, x[1:, None]).sum().item()
            n += 31
    assert perplexity(model, ids, 32, batch_tokens=96) == pytest.approx(math.exp(nll / n), rel=1e-5)
    res = perplexities(model, ids, (16, 64), max_tokens=128)
    assert set(res) == {16, 64} and all(v > 1 for v in res.values())


def test_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, torch.arange(10), 32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, torch.zeros(1000, dtype=torch.long), 512)
    with pytest.raises(ValueError, match="1-D integer"):
        perplexity(model, torch.zeros(10), 4)
