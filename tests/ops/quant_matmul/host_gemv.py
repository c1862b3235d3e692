"""The CUDA GEMV's own source (csrc/quant_matmul/gemv_mma.cu) run on the CPU: g++ compiles it with cuda_host.h
(the CUDA built-ins and the .cu's inline-PTX helpers in host C++, every thread a host thread), and ``run``
launches a kernel with the grid and arguments that the launcher's ``launch_plan`` gives (CPU tensors, a chosen
SM count). What the GPU would compute, lane by lane, bar timing and the GPU compiler."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import torch

from maca_kernels.ops.quant_matmul import cuda_kernel
from maca_kernels.ops.quant_matmul.mma_layout import MmaWeight

HERE = Path(__file__).resolve().parent
PRELUDE = HERE / "cuda_host.h"
BUILD = HERE.parents[2] / "build" / "cuda_host"
GXX = shutil.which("g++")


def kernel_names() -> list[str]:
    """Every kernel instantiated in the .cu (its MACA_GEMV_MMA_ROWS lines, each with its _m16 twin)."""
    text = cuda_kernel.SOURCE.read_text()
    names = re.findall(r"^MACA_GEMV_MMA_ROWS\((\w+),", text, re.M)
    return [n + s for n in names for s in ("", "_m16")]


@functools.cache
def library() -> ctypes.CDLL:
    """The emulation library, built once per source version (~1 min for every kernel on 2 cores)."""
    if GXX is None:
        raise RuntimeError("g++ not found")
    source = cuda_kernel.SOURCE.read_text()
    table = "\n".join(f'  {{"{n}", &host::Launch<decltype({n})>::run<&{n}>}},' for n in kernel_names())
    harness = (f'#include "{PRELUDE}"\n#include "{cuda_kernel.SOURCE}"\n'
               "using Runner = void (*)(int, int, int, void**);\n"
               "static const struct { const char* name; Runner run; } kTable[] = {\n" + table + "\n};\n"
               'extern "C" int maca_host_launch(const char* name, int gx, int threads, int smem, void** argv) {\n'
               "  for (const auto& e : kTable) {\n"
               "    if (std::strcmp(e.name, name)) continue;\n"
               "    try { e.run(gx, threads, smem, argv); } catch (const std::exception&) { return 2; }\n"
               "    return 0;\n  }\n  return 1;\n}\n")
    key = hashlib.sha256((source + PRELUDE.read_text() + harness).encode()).hexdigest()[:16]
    lib = BUILD / f"gemv_host_{key}.so"
    if not lib.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        src = BUILD / f"gemv_host_{key}.cpp"
        src.write_text(harness)
        tmp = lib.with_suffix(".tmp.so")
        res = subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(tmp),
                              str(src)], capture_output=True, text=True, timeout=900)
        if res.returncode:
            raise RuntimeError(res.stderr[-6000:])
        tmp.rename(lib)  # whole or absent
    return ctypes.CDLL(str(lib))


def run(x: torch.Tensor, w: MmaWeight, n_sms: int = 132, deterministic: bool = False) -> torch.Tensor:
    """y = the kernel's output for CPU fp16 / bf16 ``x`` [M, K] (input order) on layout ``w``, launched as
    cuda_kernel launches it on a GPU with ``n_sms`` SMs; y and the dynamic shared memory start as NaN, so
    anything the kernel leaves unwritten shows."""
    name = cuda_kernel.kernel_name(w.bits, w.kernel_group, x.dtype == torch.bfloat16, x.shape[0])
    plan = cuda_kernel.launch_plan(x, w, n_sms, deterministic)
    plan.y.fill_(float("nan"))
    holders = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in plan.args]
    argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    status = library().maca_host_launch(name.encode(), plan.grid[0], plan.block[0], plan.shared_mem, argv)
    if status:
        raise RuntimeError(f"{name}: {'not in the emulation library' if status == 1 else 'a launch the GPU refuses'}")
    return plan.y
