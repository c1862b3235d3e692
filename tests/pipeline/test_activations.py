"""Where calibration inputs wait between layers (pipeline/activations.py): the placement rule, the argument check,
and (GPU tier) that keeping them in pinned host memory gives the bits of keeping them on the device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import needs_gpu  # noqa: E402
from tiny_models import random_sequences, tiny_model  # noqa: E402

from maca_kernels.pipeline import quantize_model  # noqa: E402
from maca_kernels.pipeline.activations import fits, keep, store_for, use  # noqa: E402
from maca_kernels.pipeline.model import Batch  # noqa: E402


def test_streams_stay_on_the_device_while_they_take_at_most_a_quarter_of_it():
    assert fits(250, 1000) and not fits(251, 1000)
    assert fits(0, 0) and not fits(1, 3)


def test_a_cpu_run_keeps_them_where_it_runs():
    cpu = torch.device("cpu")
    for place in ("auto", "device", "host"):
        assert store_for(place, cpu, 1 << 60) == cpu
    t = torch.randn(2, 3, 4)
    assert keep(t, cpu) is t
    b = Batch(t, {"x": 1})
    assert use(b, cpu) is b


def test_unknown_place_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"activations must be one of \('auto', 'device', 'host'\), got 'gpu'"):
        quantize_model(tiny_model(), random_sequences([16], seed=1), 4, 32, activations="gpu", log=None)


def test_stats_name_where_they_waited():
    model = tiny_model(seed=0)
    quantize_model(model, random_sequences([16, 32], seed=1), 4, 32, progress=False, log=None)
    assert model.quantize_stats.activations_on == "cpu"


def _run(place: str, method: str):
    model = tiny_model(seed=0, layers=2).cuda()
    quantize_model(model, random_sequences([16, 32, 32], seed=1), 4, 32, method=method, activations=place,
                   device="cuda", progress=False, log=None)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return state, model.quantize_stats


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_host_streams_give_the_device_streams_bits(method):
    on_device, s_dev = _run("device", method)
    on_host, s_host = _run("host", method)
    assert s_dev.activations_on.startswith("cuda") and s_host.activations_on == "cpu"
    assert on_device.keys() == on_host.keys()
    for k in on_device:
        assert torch.equal(on_device[k], on_host[k]), k
