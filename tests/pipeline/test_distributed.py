"""One pipeline on several processes (torch.distributed under torchrun, gloo on the CPU): the checkpoint is bit for bit
the one a single process writes, for 2 and 4 ranks, for two "nodes" on this machine, and after a rank died and the
run was resumed (with another number of ranks). Every process runs one torch thread: on a CPU the threads per
process decide the bits (MKL splits its sums by thread count), the number of ranks does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_streaming import same_folders
from tiny_models import tiny_model

from maca_kernels.pipeline.shards import balance, make_shards

HERE = Path(__file__).parent
RUNNER = str(HERE / "dist_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def alone(*args, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, RUNNER, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def torchrun(nproc: int, *args, launcher=("--standalone",), check=True, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}", RUNNER,
           *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "src"
    tiny_model("llama", seed=5, layers=3).save_pretrained(path, max_shard_size="30KB")
    return path


@pytest.mark.parametrize("method,extra", [("gptq", ["--act-order"]), ("gptaq", [])])
def test_one_two_and_four_ranks_write_the_same_checkpoint(src, tmp_path, method, extra):
    alone(src, tmp_path / "one", "--method", method, *extra)
    torchrun(2, src, tmp_path / "two", "--method", method, *extra)
    torchrun(4, src, tmp_path / "four", "--method", method, *extra)  # 4 shards of 9 sequences: one each
    same_folders(tmp_path / "one", tmp_path / "two")
    same_folders(tmp_path / "one", tmp_path / "four")


def test_in_memory_rtn_and_more_ranks_than_shards(src, tmp_path):
    torchrun(3, src, tmp_path / "three", "--in-memory", "--shards", "2")  # rank 2 runs no shard, solves modules
    alone(src, tmp_path / "one2", "--in-memory", "--shards", "2")
    same_folders(tmp_path / "one2", tmp_path / "three")
    alone(src, tmp_path / "rtn1", "--method", "rtn")
    torchrun(2, src, tmp_path / "rtn2", "--method", "rtn")
    same_folders(tmp_path / "rtn1", tmp_path / "rtn2")


def test_moe_experts_on_two_and_three_ranks(tmp_path):
    """Fused experts (Qwen3-MoE), and the same experts as a ModuleList: each expert's routed Hessians summed over the
    shards in shard order, its solves spread over the ranks; GPTAQ (both streams route through the experts)."""
    from tiny_models import tiny_moe

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "moe")
    args = ("--in-memory", "--method", "gptaq", "--shards", "3")
    alone(tmp_path / "moe", tmp_path / "one", *args)
    torchrun(2, tmp_path / "moe", tmp_path / "two", *args)
    torchrun(3, tmp_path / "moe", tmp_path / "three", *args)
    same_folders(tmp_path / "one", tmp_path / "two")
    same_folders(tmp_path / "one", tmp_path / "three")
    alone(tmp_path / "moe", tmp_path / "list1", *args, "--list-experts")  # experts as a ModuleList of MLPs
    torchrun(2, tmp_path / "moe", tmp_path / "list2", *args, "--list-experts")
    same_folders(tmp_path / "list1", tmp_path / "list2")


def test_two_nodes_on_one_machine(src, tmp_path):
    alone(src, tmp_path / "one")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=maca-test", RUNNER, str(src), str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for n in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    same_folders(tmp_path / "one", tmp_path / "two")


def test_a_dead_rank_stops_the_run_and_the_rerun_resumes_with_the_same_bits(src, tmp_path):
    alone(src, tmp_path / "whole", "--method", "gptaq")
    state = tmp_path / "state"
    t0 = time.perf_counter()
    p = torchrun(2, src, tmp_path / "out", "--method", "gptaq", "--resume", state, "--die-after-layer", 0,
                 check=False)
    took = time.perf_counter() - t0
    assert p.returncode != 0 and took < 120, (p.returncode, took)
    assert "exitcode  : 3" in p.stderr or "exit code 3" in p.stderr or "exitcode: 3" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))
    import json

    assert json.loads((state / "progress.json").read_text())["done_layers"] == 1
    alone(src, tmp_path / "out", "--method", "gptaq", "--resume", state)  # one process takes over from two
    same_folders(tmp_path / "whole", tmp_path / "out")


def test_ranks_given_other_arguments_stop_before_any_work(src, tmp_path):
    t0 = time.perf_counter()
    p = torchrun(2, src, tmp_path / "out", "--method", "gptq", "--rank1-method", "gptaq", check=False)
    assert p.returncode != 0 and time.perf_counter() - t0 < 120
    assert "ranks [1] were given other arguments" in p.stderr, p.stderr[-3000:]


def test_shard_sums_are_the_shard_order_sums_on_any_world(tmp_path):
    """Entries whose shards' values span few binary orders are exact in float64 in any order (one all_reduce);
    the others (here: 2^30, 2^-30, -2^30, 2^-30, ...) are gathered and added in shard order, as one rank adds them."""
    script = str(HERE / "dist_sums.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one.pt"), "1"], check=True, env=ENV, timeout=120)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script,
                        str(tmp_path / "two.pt"), "2"], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["counts"] == two["counts"] == [6, 60]
    for a, b in zip(one["totals"], two["totals"], strict=True):
        assert torch.equal(a, b)
    assert one["totals"][0][0, 0] == 1 + 2.0**-30  # the shard order's float64 sum (ranks' own sums first give 1)
    assert two["wide"] == 4  # [0, 0] and [3, 4] of both sums went the ordered way, and nothing else


def test_shards_are_fixed_by_the_calibration_not_the_world():
    groups = [torch.arange(n * L).reshape(n, L) for n, L in ((3, 16), (2, 32), (1, 48), (2, 64), (1, 80))]
    one = make_shards(groups, 1, 100, world_size=1)
    whole = [b.tolist() for g in groups for b in g.split(max(1, 100 // g.shape[1]))]  # the batching of one shard
    assert [b.tolist() for b in one.batches[0]] == whole
    four = [make_shards(groups, 4, 100, world_size=w) for w in (1, 2, 3, 4, 7)]
    for s in four[1:]:
        assert [[b.tolist() for b in bs] for bs in s.batches] == [[b.tolist() for b in bs] for bs in four[0].batches]
    rows = sorted(tuple(r) for bs in four[0].batches for b in bs for r in b.tolist())
    assert rows == sorted(tuple(r) for g in groups for r in g.tolist())  # every sequence in exactly one shard
    assert four[1].owner[0] == 0 and sorted(set(four[-1].owner)) == [0, 1, 2, 3]  # 7 ranks: 3 run no shard
    assert len(make_shards(groups, 64, 100, world_size=2).batches) == 9  # at most one shard per sequence
    assert balance([5, 9, 9, 1], 2) == [0, 0, 1, 1]  # longest first, ties by index, to the least loaded bin
