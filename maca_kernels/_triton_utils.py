"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch

# triton.jit decides between compiling and interpreting when the decorator runs, so this is read once.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MACA_KERNELS_TUNE=quick trims every autotune list to a few configs (a time-boxed GPU session).
TUNE_QUICK = os.environ.get("MACA_KERNELS_TUNE", "full") == "quick"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency on GPU machines only
    HAS_TRITON = False


def check_triton_device(x: torch.Tensor, op: str) -> None:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; anything else is an error."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package")
    if x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETING):
        return
    raise ValueError(
        f"{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before import for CPU "
        f"tensors), got a tensor on {x.device}"
    )


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so tests still exercise the split-K path
