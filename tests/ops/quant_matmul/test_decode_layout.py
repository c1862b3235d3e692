"""The decode layout (act-order rows of K in group order): exact round trip to the checkpoint tensors,
products against float64 on every backend and schedule, the sorted kernel path for act-order layers, and
QuantLinear converting at load while its state_dict keeps the checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from helpers import randn
from qmm_helpers import random_checkpoint

import maca_kernels as mk
from maca_kernels._triton_utils import INTERPRETING
from maca_kernels.nn.quant_linear import checkpoint_qweights_on
from maca_kernels.ops.quant_matmul import op as qmm_op

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def rel(y, want):
    return ((y.double() - want).norm() / want.norm()).item()


def uneven_g_idx(K: int, G: int, seed: int) -> torch.Tensor:
    """Every group used, sizes unequal, rows shuffled: not what GPTQ writes, but a valid checkpoint."""
    g = torch.Generator().manual_seed(seed)
    gi = torch.cat([torch.arange(G), torch.randint(0, G, (K - G,), generator=g)])
    return gi[torch.randperm(K, generator=g)].to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_round_trip_is_exact_and_products_match(bits, group_size, fmt):
    N = 96 if bits == 3 else 80  # odd multiples of the qzeros packing
    W, qw, sc, qz, g_idx = random_checkpoint(N, 256, bits, group_size, True, seed=bits + group_size, convention=fmt)
    before = [t.clone() for t in (qw, sc, qz, g_idx)]
    d = mk.to_decode_weight(qw, sc, qz, g_idx, bits, group_size, fmt)
    assert all(torch.equal(a, b) for a, b in zip(before, (qw, sc, qz, g_idx), strict=True)), "inputs were modified"
    # GPTQ act-order groups are all the same size: no g_idx left, the sorted kernels run (one group: no
    # order to restore at all)
    assert d.g_idx is None and (d.perm is None) == (group_size == -1)
    assert d.group_size == (256 if group_size == -1 else group_size)
    back = d.to_checkpoint()
    assert set(back) == {"qweight", "qzeros", "scales", "g_idx"}
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", g_idx)):
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # the rows really are in group order: dequantizing the decode layout gives W's columns permuted
    W_dec = mk.dequantize_gptq(d.qweight, sc, qz, torch.arange(256) // d.group_size, bits, fmt)
    assert torch.equal(W_dec.double(), W if d.perm is None else W[:, d.perm])
    for M in (1, 5):
        x = randn(M, 256, seed=M)
        assert rel(d.matmul(x), x.double() @ W.T) <= TOL[torch.float32]


def test_sorted_and_ungrouped_weights_are_kept_as_they_are():
    W, qw, sc, qz, _ = random_checkpoint(64, 256, 4, 64, False, seed=1)
    for g_idx in (None, (torch.arange(256) // 64).to(torch.int32)):
        d = mk.to_decode_weight(qw, sc, qz, g_idx, 4, 64)
        assert d.perm is None and d.g_idx is None and d.qweight is qw
        assert torch.equal(d.to_checkpoint()["qweight"], qw)
        assert ("g_idx" in d.to_checkpoint()) == (g_idx is not None)


@pytest.mark.parametrize("bits", [3, 4])
def test_uneven_groups_keep_a_sorted_g_idx(bits):
    W, qw, sc, qz, _ = random_checkpoint(64, 256, bits, 32, False, seed=2)
    g_idx = uneven_g_idx(256, 8, seed=bits)
    W = mk.dequantize_gptq(qw, sc, qz, g_idx, bits).double()
    d = mk.to_decode_weight(qw, sc, qz, g_idx, bits, 32)
    assert d.g_idx is not None and torch.all(d.g_idx[1:] >= d.g_idx[:-1])
    assert torch.equal(d.to_checkpoint()["qweight"], qw) and torch.equal(d.to_checkpoint()["g_idx"], g_idx)
    x = randn(3, 256, seed=3)
    assert rel(d.matmul(x), x.double() @ W.T) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("M", [1, 5, 67])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_backend_and_schedule(backend, M, bits):
    if backend == "triton" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    dtype = torch.float32 if backend != "triton" else torch.float16
    N = 96 if bits == 3 else 80
    W, qw, sc, qz, g_idx = random_checkpoint(N, 256, bits, 64, True, seed=10 * bits + M)
    d = mk.to_decode_weight(qw, sc, qz, g_idx, bits, 64)
    x = randn(M, 256, dtype=dtype, seed=M)
    y = d.matmul(x, backend=backend)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, x.double() @ W.T) <= TOL[dtype]


def test_act_order_runs_the_sorted_kernel(monkeypatch):
    """The point of the layout: the kernels never see a g_idx for a GPTQ act-order layer."""
    seen = []
    real = qmm_op._quant_matmul_op
    monkeypatch.setattr(qmm_op, "_quant_matmul_op", lambda *a: seen.append(a[4]) or real(*a))
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, 4, 32, True, seed=4)
    d = mk.to_decode_weight(qw, sc, qz, g_idx, 4, 32)
    d.matmul(randn(1, 256, seed=5))
    layer = mk.QuantLinear.from_checkpoint({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}, 4, 32)
    layer(randn(2, 256, seed=6))
    mk.quant_matmul(randn(1, 256, seed=7), qw, sc, qz, g_idx, 4, 32)  # the per-call path still gathers
    assert [s is None for s in seen] == [True, True, False]


def test_quant_linear_converts_at_load_and_saves_the_checkpoint_layout():
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, 3, 32, True, seed=8)
    tensors = {"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}
    layer = mk.QuantLinear.from_checkpoint(tensors, 3, 32)
    assert layer.act_order and layer.perm is not None and not torch.equal(layer.qweight, qw)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx"}
    for name, t in tensors.items():
        assert torch.equal(sd[name], t), name
        assert torch.equal(layer.checkpoint_tensors()[name], t), name
    x = randn(4, 256, seed=9)
    assert rel(layer(x), x.double() @ W.T) <= TOL[torch.float32]
    # save_quantized's context: the permuted copy goes to the given device as it is built (meta here: any
    # device other than the layer's shows the move); other tensors and later state_dicts are untouched
    with checkpoint_qweights_on("meta"):
        moved = layer.state_dict()
    assert moved["qweight"].is_meta and moved["scales"].device == sc.device
    assert torch.equal(layer.state_dict()["qweight"], qw)
    fresh = mk.QuantLinear(256, 64, bits=3, group_size=32)
    assert not fresh.act_order
    fresh.load_state_dict(sd)
    assert fresh.act_order and torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(sd)  # loading again (over the converted buffers) converts from the new tensors
    assert torch.equal(fresh(x), layer(x)) and torch.equal(fresh.state_dict()["qweight"], qw)
    # a sorted checkpoint loaded over an act-order layer drops the permutation
    W2, qw2, sc2, qz2, _ = random_checkpoint(64, 256, 3, 32, False, seed=10)
    fresh.load_state_dict({"qweight": qw2, "scales": sc2, "qzeros": qz2,
                           "g_idx": (torch.arange(256) // 32).to(torch.int32)})
    assert not fresh.act_order and rel(fresh(x), x.double() @ W2.T) <= TOL[torch.float32]


def test_quant_linear_act_order_compiles_on_cpu():
    W, qw, sc, qz, g_idx = random_checkpoint(64, 128, 4, 32, True, seed=11)
    layer = mk.QuantLinear.from_checkpoint({"qweight": qw, "scales": sc, "qzeros": qz, "g_idx": g_idx}, 4, 32)
    compiled = torch.compile(layer, fullgraph=True)
    x = randn(3, 128, seed=12)
    torch.testing.assert_close(compiled(x), layer(x))
    assert rel(compiled(x), x.double() @ W.T) <= TOL[torch.float32]


def test_bad_input():
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, 4, 32, True, seed=13)
    with pytest.raises(ValueError, match="g_idx must lie in"):
        mk.to_decode_weight(qw, sc, qz, g_idx + 8, 4, 32)
    with pytest.raises(ValueError, match="scales must be"):
        mk.to_decode_weight(qw, sc[:, :32], qz, g_idx, 4, 32)
    d = mk.to_decode_weight(qw, sc, qz, g_idx, 4, 32)
    with pytest.raises(ValueError, match="K = 256"):
        d.matmul(randn(2, 128, seed=14))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        d.matmul([1.0] * 256)


def test_quant_linear_loading_edge_cases():
    """assign=True never writes into the caller's tensors; a load without this layer's weights keeps the
    layout as it is; a bad g_idx is refused before anything changes."""
    W, qw, sc, qz, g_idx = random_checkpoint(64, 256, 4, 32, True, seed=20)
    sd = {"qweight": qw.clone(), "scales": sc.clone(), "qzeros": qz.clone(), "g_idx": g_idx.clone()}
    x = randn(3, 256, seed=21)
    layers = [mk.QuantLinear(256, 64, bits=4, group_size=32) for _ in range(2)]
    for layer in layers:
        layer.load_state_dict(sd, assign=True)
        assert rel(layer(x), x.double() @ W.T) <= TOL[torch.float32]
    assert torch.equal(sd["qweight"], qw)  # both layers loaded from it; it is still the checkpoint's
    layer = layers[0]
    before = (layer.qweight.data_ptr(), layer.perm)
    layer.load_state_dict({}, strict=False)
    assert (layer.qweight.data_ptr(), layer.perm) == before
    bad = dict(sd, g_idx=g_idx + 8)  # G = 8 groups: values up to 15
    with pytest.raises(ValueError, match="g_idx must lie in"):
        layer.load_state_dict(bad)
    assert rel(layer(x), x.double() @ W.T) <= TOL[torch.float32]
