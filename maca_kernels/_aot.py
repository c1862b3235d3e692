"""Ahead-of-time compilation of Triton kernels for a GPU architecture, on any machine.

Used by the compile tier of the tests: it catches what the interpreter cannot (layouts, shared memory,
register spills, missing tensor-core paths) without a GPU. ptxas ships inside the triton wheel.

A variant is described the way a launcher calls the kernel: representative argument VALUES (ints and
``AotTensor`` stand-ins for torch tensors) plus the constexpr / launch keyword arguments. The signature,
the constexprs and the ``tt.divisibility`` attributes are then derived by triton's own JIT binder
(``create_function_from_signature`` → ``native_specialize_impl`` → ``JITFunction._pack_args``), so the
compiled code is what ``kernel[grid](...)`` would build on the GPU: integers divisible by 16 (and 16-aligned
pointers) get ``tt.divisibility = 16``, an integer equal to 1 becomes a constexpr, ints beyond 32 bits i64.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# Per-block shared memory limits (opt-in maximum) in bytes.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

# torch's CUDA caching allocator hands out blocks aligned to 512 bytes; any multiple of 16 gives the same
# specialisation.
_FAKE_ADDRESS = 0x7F00_0000_0000


class AotTensor:
    """What the JIT reads from a tensor argument: ``dtype`` and ``data_ptr()`` (plus shape/stride so
    variants can compute their stride arguments the way the launcher does)."""

    def __init__(self, dtype, *shape: int, address: int = _FAKE_ADDRESS):
        self.dtype = dtype
        self.shape = tuple(shape) or (1,)
        self._address = address

    def data_ptr(self) -> int:
        return self._address

    def stride(self, dim: int | None = None):
        strides, acc = [], 1
        for size in reversed(self.shape):
            strides.append(acc)
            acc *= size
        strides = tuple(reversed(strides))
        return strides if dim is None else strides[dim]

    def __repr__(self):
        return f"AotTensor({self.dtype}, {self.shape})"


@dataclass
class Variant:
    """One compile of a kernel: ``kernel[grid](*args, **kwargs)`` as the launcher issues it.

    ``kernel`` is a ``triton.jit`` function (or an autotuner wrapping one; the config's values go in
    ``kwargs``). ``archs`` lists the targets this variant runs on (a config that the launcher prunes on
    sm_8x is sm_90 only)."""

    name: str
    kernel: object
    args: tuple
    kwargs: dict
    archs: tuple = (90, 80)
    meta: dict = field(default_factory=dict)  # free-form, copied into the tier's JSON (shape, schedule…)


@dataclass
class CompiledKernel:
    name: str
    arch: int
    ptx: str
    ttgir: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    cubin: bytes = b""


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # Autotuner / Heuristics wrap the JITFunction in .fn
        kernel = kernel.fn
    return kernel


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specialise(variant: Variant, arch: int):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for these arguments on ``arch``."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit_function(variant.kernel)
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(variant.kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*variant.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options


def compile_key(variant: Variant, arch: int) -> str:
    """Triton's own cache key of the compile: equal keys build identical binaries."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    src, options = specialise(variant, arch)
    backend = make_backend(_target(arch))
    key = get_cache_key(src, backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode()).hexdigest()


def describe(variant: Variant, arch: int) -> dict:
    """The specialisation in readable form: {arg: type[/D for divisible by 16]} and the constexprs."""
    src, options = specialise(variant, arch)
    names = _jit_function(variant.kernel).arg_names
    divisible = {path[0] for path, attr in src.attrs.items() if ["tt.divisibility", 16] in attr}
    sig = {n: ty + ("/D" if i in divisible else "") for i, (n, ty) in enumerate(src.signature.items())
           if ty != "constexpr"}
    const = {names[path[0]]: v for path, v in src.constants.items()}
    return {"signature": sig, "constexprs": const, "num_warps": options.num_warps,
            "num_stages": options.num_stages}


def _usage_cache_dir() -> str:
    from triton import knobs

    path = os.path.join(knobs.cache.dir, "maca_aot_usage")
    os.makedirs(path, exist_ok=True)
    return path


def _ptxas_usage(ptx: str, arch: int, options) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` run with the flags triton's ``make_cubin`` uses for
    these options (``-lineinfo``, ``--fmad=false`` without fp fusion, ``ptx_options``); cached on disk
    beside triton's cache."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    flags = ["-lineinfo"] + ([] if options.enable_fp_fusion else ["--fmad=false"])
    flags += options.ptx_options.split(" ") if options.ptx_options else []
    flags.append(f"--gpu-name={sm_arch_from_capability(arch)}")
    digest = hashlib.sha256(("\n".join([ptxas, *flags, ptx])).encode()).hexdigest()
    cached = os.path.join(_usage_cache_dir(), digest + ".json")
    if os.path.exists(cached):
        with open(cached) as f:
            regs, spills = json.load(f)
        return regs, spills
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", *flags, src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr))
    tmp_path = f"{cached}.{os.getpid()}.tmp"
    with open(tmp_path, "w") as f:
        json.dump([regs, spills], f)
    os.replace(tmp_path, cached)
    return regs, spills


def main_loop_sass(cubin: bytes) -> int | None:
    """Instructions in the largest innermost loop of the kernel's SASS (the K loop of a GEMV), or None."""
    import triton.backends.nvidia as nv

    nvdisasm = os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    labels, instrs = {}, []  # label -> instruction index; instruction texts in order
    for line in res.stdout.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
        elif re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            instrs.append(line)
    loops = []  # (start, end) of backward branches
    for i, text in enumerate(instrs):
        m = re.search(r"\bBRA\b[^;]*?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))
    inner = [(s, e) for s, e in loops if not any(s < s2 and e2 <= e for s2, e2 in loops if (s2, e2) != (s, e))]
    if not inner:
        return None
    s, e = max(inner, key=lambda se: se[1] - se[0])
    return e - s + 1


def compile_variant(variant: Variant, arch: int) -> CompiledKernel:
    import triton

    src, options = specialise(variant, arch)
    k = triton.compile(src, target=_target(arch), options=options.__dict__)
    regs, spills = _ptxas_usage(k.asm["ptx"], arch, options)
    return CompiledKernel(variant.name, arch, k.asm["ptx"], k.asm["ttgir"], k.metadata.shared, regs, spills,
                          k.asm.get("cubin", b""))
