"""QuantLinear refuses what it cannot hold: bad constructor arguments at once (not at forward), and a state dict
whose tensors have the wrong dtype or shape (a cast would change the packed words or round the scales) with
nothing of the layer changed, under every load_state_dict mode."""

from __future__ import annotations

import pytest
import torch
from helpers import randn

import maca_kernels as mk


def quantized_layer(seed: int, act_order: bool = True) -> mk.QuantLinear:
    W, x = randn(64, 256, seed=seed), randn(512, 256, seed=seed + 1)
    q = mk.gptq_quantize(W, x.T @ x / 512, bits=4, group_size=128, act_order=act_order)
    return mk.QuantLinear.from_gptq(q, bias=randn(64, seed=seed + 2))


def snapshot(layer):
    """Every tensor of the layer (buffers by identity and value) and its product."""
    x = randn(3, 256, seed=99)
    y = None if layer.cuda_gemv else layer(x)
    return {n: (b, b.clone()) for n, b in layer._buffers.items() if b is not None}, y


def assert_unchanged(layer, snap):
    buffers, y = snap
    now = {n: b for n, b in layer._buffers.items() if b is not None}
    assert now.keys() == buffers.keys()
    for n, (b, copy) in buffers.items():
        assert now[n] is b and torch.equal(b, copy), n
    if y is not None:
        assert torch.equal(layer(randn(3, 256, seed=99)), y)


BAD = [
    ("qweight", lambda t: t.float(), r"qweight has dtype torch.float32, expected torch.int32"),
    ("qzeros", lambda t: t.long(), r"qzeros has dtype torch.int64, expected torch.int32"),
    ("scales", lambda t: t.float(), r"scales has dtype torch.float32, expected torch.float16"),
    ("g_idx", lambda t: t.long(), r"g_idx has dtype torch.int64, expected torch.int32"),
    ("g_idx", lambda t: t.float(), r"g_idx has dtype torch.float32, expected torch.int32"),
    ("bias", lambda t: t.int(), r"bias has dtype torch.int32, expected a floating dtype"),
    ("qweight", lambda t: t[:-1], r"qweight has shape \(31, 64\), expected \(32, 64\)"),
    ("scales", lambda t: t[:, :-1], r"scales has shape \(2, 63\), expected \(2, 64\)"),
]


@pytest.mark.parametrize("key, corrupt, match", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("assign", [False, True])
def test_wrong_dtype_or_shape_is_refused_and_nothing_changes(key, corrupt, match, strict, assign):
    layer = quantized_layer(seed=0)
    sd = quantized_layer(seed=10).state_dict()  # other weights: a partial load would show
    sd[key] = corrupt(sd[key])
    snap = snapshot(layer)
    with pytest.raises(RuntimeError, match=match):  # torch's error_msgs: reported with the other modules' errors
        layer.load_state_dict(sd, strict=strict, assign=assign)
    assert_unchanged(layer, snap)


def test_refused_with_the_cuda_gemv_layout_on():
    layer = quantized_layer(seed=0).enable_cuda_gemv()
    sd = quantized_layer(seed=10).state_dict()
    snap = snapshot(layer)
    with pytest.raises(RuntimeError, match="qweight has dtype torch.float32"):
        layer.load_state_dict(dict(sd, qweight=sd["qweight"].float()))
    assert layer.cuda_gemv
    assert_unchanged(layer, snap)


def test_meta_tensors_are_checked_by_dtype_and_shape():
    layer = mk.QuantLinear(256, 64, bits=4, group_size=128, device="meta")
    sd = {k: v.to("meta") for k, v in mk.QuantLinear(256, 64, bits=4, group_size=128).state_dict().items()}
    before = dict(layer._buffers)
    with pytest.raises(RuntimeError, match="scales has dtype torch.float32"):
        layer.load_state_dict(dict(sd, scales=sd["scales"].float()), assign=True)
    assert all(layer._buffers[n] is b for n, b in before.items())
    layer.load_state_dict(sd, assign=True)  # no values to convert: the layout waits for real weights
    assert layer.qweight is sd["qweight"]


def test_good_state_dicts_still_load():
    layer, other = quantized_layer(seed=0), quantized_layer(seed=10)
    x = randn(3, 256, seed=5)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    layer.load_state_dict({"bias": randn(64, dtype=torch.bfloat16, seed=6)}, strict=False)  # any float bias


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bits=4.0), ValueError, r"bits must be one of \(2, 3, 4, 8\), got 4.0"),
        (dict(bits=True), ValueError, "bits must be one of"),
        (dict(group_size=0), ValueError, "group_size must be -1 .* got 0"),
        (dict(group_size=48), ValueError, "group_size must be -1 .* got 48"),
        (dict(group_size=128.0), ValueError, "group_size must be -1 .* got 128.0"),
        (dict(checkpoint_format="gptq_v3"), ValueError, "checkpoint_format must be one of"),
        (dict(out_features=12), ValueError, "out_features = 12 must be a multiple of 8 for bits=4"),
        (dict(in_features=260, group_size=-1), ValueError, "in_features = 260 must be a multiple of 8 for bits=4"),
        (dict(bits=3, out_features=80), ValueError, "out_features = 80 must be a multiple of 32 for bits=3"),
        (dict(in_features=0), ValueError, "in_features must be a positive int"),
        (dict(out_features=64.0), ValueError, "out_features must be a positive int"),
    ],
)
def test_constructor_refuses_bad_arguments(kwargs, exc, match):
    args = dict(in_features=256, out_features=96, bits=4, group_size=128)
    with pytest.raises(exc, match=match):
        mk.QuantLinear(**{**args, **kwargs})


def test_from_checkpoint_refuses_float_bits():
    sd = quantized_layer(seed=0, act_order=False).state_dict()
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 4.0"):
        mk.QuantLinear.from_checkpoint(sd, 4.0, 128)
