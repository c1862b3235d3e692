"""Ahead-of-time compilation of Triton kernels for a GPU architecture, on any machine.

Used by the compile tier of the tests: it catches what the interpreter cannot (layouts, shared memory,
register spills, missing tensor-core paths) without a GPU. ptxas ships inside the triton wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# Pointers and these integer arguments are 16-divisible in every real launch (the JIT specialises on
# that); without the hint the compiler cannot vectorise and does not pipeline the loads.
ALIGNED_INTS = ("d", "stride_row", "stride_out", "stride_upper")


@dataclass
class CompiledKernel:
    name: str
    arch: int
    ptx: str
    ttgir: str
    shared_bytes: int
    registers: int
    spill_bytes: int


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    import triton.backends.nvidia as nv

    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr))
    return regs, spills


def compile_kernel(name, fn, signature: dict, constexprs: dict, options: dict, arch: int) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    aligned = [n for n, ty in signature.items() if ty.startswith("*") or n in ALIGNED_INTS]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _ptxas_usage(k.asm["ptx"], arch)
    return CompiledKernel(name, arch, k.asm["ptx"], k.asm["ttgir"], k.metadata.shared, regs, spills)
