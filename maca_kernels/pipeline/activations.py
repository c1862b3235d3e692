"""Where a layer's calibration inputs wait between uses: on the device that runs the layer when they fit, else in
host memory (pinned, so each micro-batch goes back to the GPU by DMA without a staging copy). Moving a tensor is
exact, so the checkpoint's bits never depend on where the inputs were kept."""

from __future__ import annotations

import torch

from .model import Batch

PLACES = ("auto", "device", "host")


def check_place(place) -> str:
    if place not in PLACES:
        raise ValueError(f"activations must be one of {PLACES}, got {place!r}")
    return place


def fits(stream_bytes: int, free: int) -> bool:
    """A layer's forward holds its inputs and its outputs at once, and the layer's copies, Hessians and solves need
    room beside them: the streams stay on the device while twice their size is at most half of what is free."""
    return 2 * stream_bytes <= free // 2


def free_bytes(device: torch.device) -> int:
    """Memory free for more tensors on ``device``: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
    except (OSError, StopIteration):
        return 1 << 62  # unknown: no limit assumed


def store_for(place: str, device: torch.device, stream_bytes: int) -> torch.device:
    """Where the inputs are kept for a run on ``device`` whose streams take ``stream_bytes``."""
    if device.type != "cuda" or place == "device":
        return device  # a CPU layer reads host memory anyway
    if place == "host":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if fits(stream_bytes, free) else torch.device("cpu")


def keep(t: torch.Tensor, store: torch.device) -> torch.Tensor:
    """``t`` where it waits until it is used again."""
    if t.device == store:
        return t
    if store.type == "cpu" and t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)  # synchronous: the host copy may be read at once (the resume commit writes it)
        return out
    return t.to(store)


def use(b: Batch, device: torch.device) -> Batch:
    """``b`` with its inputs on the device that runs the layer (its keyword arguments always live there)."""
    if b.hidden.device == device:
        return b
    return Batch(b.hidden.to(device, non_blocking=True), b.kwargs)


__all__ = ["PLACES", "check_place", "fits", "free_bytes", "keep", "store_for", "use"]
