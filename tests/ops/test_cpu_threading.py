"""Threading of the C++ CPU kernels (csrc/common/parallel.h): results do not depend on the thread count,
and a busy machine, concurrent callers or a fork never make a kernel hang.

The kernels split work into chunks that the calling thread and any helper claim dynamically; every output
element is computed the same way whoever runs it, so results must be *bit-identical* for any thread count,
including more threads than cores. No timing is asserted here (benchmarks/bench_cpu_load.py measures it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from maca_kernels import _C
from maca_kernels.ops.hessian.cpu_kernel import cpu_weighted_gram
from maca_kernels.ops.quant_matmul.cpu_kernel import cpu_quant_matmul

THREADS = [1, 2, 3, 7]  # 7: more threads than this machine's cores
HANG_S = 120  # generous: a deadlock, not slowness, is what this catches


def _words(*shape, g):
    """Random int32 words: every bit pattern is a valid packed code / zero point."""
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)


def qmm_case(bits, N, K, seed=0, act_order=False):
    g = torch.Generator().manual_seed(seed)
    G = K // 32
    qweight = _words(K * bits // 32, N, g=g)
    qzeros = _words(G, N * bits // 32, g=g)
    scales = (torch.rand(G, N, generator=g) * 0.03 + 1e-3).half()
    g_idx = None
    if act_order:
        g_idx = (torch.arange(K) // 32)[torch.randperm(K, generator=g)].to(torch.int32)
    return qweight, scales, qzeros, g_idx


def qmm(x, case, bits, num_threads):
    qweight, scales, qzeros, g_idx = case
    return cpu_quant_matmul(x, qweight, scales, qzeros, g_idx, bits, 32, num_threads=num_threads)


def gram_case(d, seed=0, cross=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 37, 300, 1, 2, 259, 611, 5, 1, 77, 3])  # ragged, across K-blocks
    start = torch.cumsum(lengths, 0) - lengths
    runs = (start, lengths, (1.0 / lengths.double()).float())
    x = torch.randn(int(lengths.sum()), d, generator=g)
    b = torch.randn(x.shape, generator=g) if cross else None
    return x, b, runs


def gram(case, num_threads):
    x, b, runs = case
    out = torch.zeros(x.shape[1], x.shape[1])
    cpu_weighted_gram(out, x, runs, b=b, num_threads=num_threads)
    return out


def gram_raw(case, num_threads, scratch_budget_bytes):
    """Straight to the binding, to force column stripes with a small scratch budget."""
    x, b, (start, length, weight) = case
    d = x.shape[1]
    out = torch.zeros(d, d)
    _C.weighted_gram(out.data_ptr(), d, d, x.data_ptr(), 0, 0 if b is None else b.data_ptr(), 0, x.stride(0),
                     start.data_ptr(), length.data_ptr(), weight.data_ptr(), start.numel(), num_threads,
                     scratch_budget_bytes)
    return out


def sweep(w, u, num_threads, p=None, group_size=32, n_shrink=0):
    """One GPTQ column block (all columns of w) through the native sweep; returns every output."""
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int32)
    scales = torch.empty(n, k // group_size)
    zeros = torch.empty_like(scales)
    err = torch.empty(n, k)
    wq = torch.empty(n, k) if p is not None else None
    gpos = torch.zeros(k, dtype=torch.int64)
    shrink = torch.linspace(1.0, 0.8, n_shrink) if n_shrink else None
    _C.gptq_block_sweep(w.data_ptr(), k, n, 0, k, u.data_ptr(), 0 if p is None else p.data_ptr(), k,
                        codes.data_ptr(), k, scales.data_ptr(), zeros.data_ptr(), k // group_size, group_size,
                        gpos.data_ptr(), err.data_ptr(), 0 if wq is None else wq.data_ptr(), k, 15, False,
                        0 if shrink is None else shrink.data_ptr(), n_shrink, 2.4, num_threads)
    return [t for t in (codes, scales, zeros, err, wq) if t is not None]


def sweep_case(n=200, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    a = torch.randn(k, k, generator=g) / k**0.5
    u = torch.linalg.cholesky(a @ a.T + torch.eye(k), upper=True).contiguous()
    p = (torch.randn(k, k, generator=g) * 0.01).triu(1).contiguous()
    return w, u, p


def assert_all_equal(results):
    first = results[0]
    for r in results[1:]:
        if isinstance(first, list):
            assert all(torch.equal(a, b) for a, b in zip(first, r, strict=True))
        else:
            assert torch.equal(first, r)


# ----------------------------------------------------------------------------------------------
# bit-identical across thread counts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits,N,K,M,dtype,act_order",
    [
        (4, 1040, 256, 1, torch.float32, False),  # GEMV: several chunks and a ragged last one
        (4, 1040, 256, 6, torch.bfloat16, False),  # GEMV: two row passes, x converted
        (8, 260, 128, 2, torch.float32, False),  # GEMV + tile tail (N % 8 == 4)
        (3, 544, 192, 1, torch.float16, False),
        (2, 528, 128, 40, torch.float32, False),  # tile path
        (4, 400, 256, 3, torch.float32, True),  # act-order: tile path
    ],
)
def test_quant_matmul_identical_for_any_thread_count(bits, N, K, M, dtype, act_order):
    case = qmm_case(bits, N, K, seed=bits + M, act_order=act_order)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    results = [qmm(x, case, bits, t) for t in THREADS]
    assert torch.isfinite(results[0]).all()
    assert_all_equal(results)


@pytest.mark.parametrize("d,cross", [(5, False), (70, True), (130, False)])
def test_weighted_gram_identical_for_any_thread_count(d, cross):
    case = gram_case(d, seed=d, cross=cross)
    assert_all_equal([gram(case, t) for t in THREADS])


def test_weighted_gram_stripes_identical_for_any_thread_count():
    case = gram_case(100, seed=3)
    budget = 102 * 48 * 4  # a few 16-column stripes
    results = [gram_raw(case, t, budget) for t in THREADS]
    assert_all_equal(results)
    assert torch.equal(results[0], gram(case, 1))  # and the same as one stripe


@pytest.mark.parametrize("gptaq,n_shrink", [(False, 0), (True, 0), (False, 3)])
def test_gptq_sweep_identical_for_any_thread_count(gptaq, n_shrink):
    w, u, p = sweep_case(seed=int(gptaq) + n_shrink)
    assert_all_equal([sweep(w, u, t, p if gptaq else None, n_shrink=n_shrink) for t in THREADS])


# ----------------------------------------------------------------------------------------------
# no hang: a competing busy process, concurrent callers, fork
# ----------------------------------------------------------------------------------------------
def _finishes(fn, timeout=HANG_S):
    """Runs fn in a daemon thread (the kernels release the GIL); fails instead of hanging forever."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not finish within {timeout} s (deadlock?)"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture
def spinner():
    """A single-threaded busy process competing for a core, like any other job on a shared machine."""
    proc = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # spinning from here on
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_kernels_finish_beside_a_busy_process(spinner):
    bits = 4
    case = qmm_case(bits, 1040, 256, seed=1)
    xs = [torch.randn(m, 256, generator=torch.Generator().manual_seed(m)) for m in (1, 40)]
    want_q = [qmm(x, case, bits, 1) for x in xs]
    gcase = gram_case(70, seed=2)
    want_g = gram(gcase, 1)
    w, u, _ = sweep_case()
    want_s = sweep(w, u, 1)

    def loaded():
        deadline = time.monotonic() + 1.5  # many calls, each long enough for preemption to hit it
        while time.monotonic() < deadline:
            for x, want in zip(xs, want_q, strict=True):
                for t in (2, 7):
                    assert torch.equal(qmm(x, case, bits, t), want)
        for t in (2, 7):
            assert torch.equal(gram(gcase, t), want_g)
            assert_all_equal([want_s, sweep(w, u, t)])

    _finishes(loaded)


def test_concurrent_callers():
    """Calls from several Python threads at once (the GIL is released): each finishes, results unchanged."""
    bits = 4
    case = qmm_case(bits, 1040, 256, seed=2)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    want = qmm(x, case, bits, 1)
    gcase = gram_case(40, seed=4)
    want_g = gram(gcase, 1)
    failures = []

    def worker(i):
        for _ in range(30):
            if not torch.equal(qmm(x, case, bits, 2 + i % 2), want):
                failures.append("quant_matmul")
            if not torch.equal(gram(gcase, 2), want_g):
                failures.append("weighted_gram")

    def run_all():
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    _finishes(run_all)
    assert not failures


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernel_in_forked_child():
    """The helper pool does not survive fork(): a child must start its own instead of waiting for ghosts."""
    bits = 4
    case = qmm_case(bits, 1040, 256, seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    want = qmm(x, case, bits, 2)  # the parent's pool is running now
    out = torch.empty_like(want)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the kernel only, then leave without running any Python cleanup
        try:
            qmm_out = cpu_quant_matmul(x, *case[:3], case[3], bits, 32, out=out, num_threads=2)
            os.write(write_fd, b"ok" if torch.equal(qmm_out, want) else b"bad")
        finally:
            os._exit(0)
    os.close(write_fd)

    def wait_child():
        _, status = os.waitpid(pid, 0)
        return status, os.read(read_fd, 16)

    try:
        status, answer = _finishes(wait_child, timeout=60)
    except AssertionError:
        os.kill(pid, 9)
        raise
    finally:
        os.close(read_fd)
    assert status == 0 and answer == b"ok"


def test_weighted_gram_many_k_blocks_beside_a_busy_process(spinner):
    """Many K-blocks (the ring of packed blocks wraps many times) while threads are preempted: the Hessian
    kernel hands its units out in whatever order they become ready, so column ranges run ahead of a
    preempted one; each element must still sum its K-blocks in order, whoever ran what."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 400, (60,), generator=g)  # ~12k tokens: ~45 K-blocks, ragged runs
    start = torch.cumsum(lengths, 0) - lengths
    runs = (start, lengths, (1.0 / lengths.double()).float())
    d = 200
    x = torch.randn(int(lengths.sum()), d, generator=g).to(torch.bfloat16)
    b = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    cases = [(x, None, runs), (x, b, runs)]
    want = [gram(c, 1) for c in cases]
    want_striped = gram_raw((x.float(), None, runs), 1, d * 64 * 4)

    def loaded():
        for _ in range(3):
            for c, w in zip(cases, want, strict=True):
                for t in (2, 3, 7):
                    assert torch.equal(gram(c, t), w)
            for t in (2, 7):
                assert torch.equal(gram_raw((x.float(), None, runs), t, d * 64 * 4), want_striped)

    _finishes(loaded)
