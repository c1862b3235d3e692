"""What the pipeline commits after each layer and reads back on resuming (the files and their single commit point:
``resume.py``): the layer's solved tensors, and each virtual shard's inputs of the next layer, so that a rerun with
any number of ranks continues where the last commit left off."""

from __future__ import annotations

import hashlib
import json

import torch

from ..formats.gptq import check_group_size
from ..ops.gptq import GPTQResult
from ..resume import ResumeDir, module_hash, tensors_hash
from .model import Batch

SAVED_FIELDS = ("codes", "scales", "zeros", "g_idx")  # the weight follows from them exactly


def run_hash(model, id_batches, settings: dict):
    """sha256 of the settings, the calibration tokens (batch by batch) and the model's config: what every rank must
    agree on before its first collective, and the start of the resume fingerprint."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for ids in id_batches:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.to(torch.int64).contiguous().numpy())
    h.update(str(getattr(model, "config", "")).encode())
    return h


def fingerprint(model, layers_name: str, id_batches, settings: dict, read=None) -> str:
    """``run_hash`` and every weight outside the decoder layers (each finished layer's weights are checked on their
    own against the manifest; ``read(name)`` gives those a streamed model has not read yet)."""
    h = run_hash(model, id_batches, settings)
    outside = {k: (lambda k=k: read(k)) if v.is_meta and read is not None else v
               for k, v in model.state_dict().items() if not k.startswith(layers_name + ".")}
    h.update(tensors_hash(outside).encode())
    return h.hexdigest()[:16]


def streams_file(layer: int, shard: int) -> str:
    return f"streams_{layer:04d}_{shard:04d}.safetensors"


def stream_tensors(q_batches: list[Batch], fp_batches: list[Batch] | None) -> dict[str, torch.Tensor]:
    """One shard's inputs of the next layer (its batches in order)."""
    out = {f"q.{i}": b.hidden for i, b in enumerate(q_batches)}
    if fp_batches is not None:
        out.update({f"fp.{i}": b.hidden for i, b in enumerate(fp_batches)})
    return out


def result_tensors(results: dict[str, dict]) -> dict[str, torch.Tensor]:
    """A layer's solved modules as the resume file stores them (codes as bytes: bits ≤ 8)."""
    return {f"{name}.{f}": rec[f] for name, rec in results.items() for f in SAVED_FIELDS}


def rebuild(name: str, tensors: dict[str, torch.Tensor], m: dict) -> GPTQResult:
    """A solved module from its saved (or broadcast) tensors and settings; the weight as gptq_quantize builds it
    (exactly ``(codes − zeros[:, g_idx]) · scales[:, g_idx]``), so every rank computes the same bits."""
    codes, scales, zeros, g_idx = (tensors[f"{name}.{f}"] for f in SAVED_FIELDS)
    codes, zeros, g_idx = codes.to(torch.int32), zeros.to(torch.int32), g_idx.to(torch.int32)
    g = g_idx.long()
    weight = (codes - zeros[:, g]).to(torch.float32) * scales[:, g]
    return GPTQResult(codes, scales, zeros, g_idx, weight, m["loss"], m["damp"], m["bits"], m["group_size"], m["sym"],
                      torch.arange(codes.shape[1]))


class LayerHashes:
    """Each layer's weight hash (resume.py), computed when first asked for (a streamed model loads one layer at
    a time): the resume state asks for the finished layers' on resuming, and for each layer as it commits."""

    def __init__(self, n: int, load_layer):
        self.n, self.load_layer, self.known = n, load_layer, {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i not in self.known:
            self.known[i] = module_hash(self.load_layer(i))
        return self.known[i]


def resumed_layer(state: ResumeDir, manifest: dict, layers_name: str, i: int, mods: dict) -> dict[str, GPTQResult]:
    """Layer i's results from the resume folder, checked against the layer's modules."""
    fname = f"layer_{i:04d}.safetensors"
    prefix = f"{layers_name}.{i}."
    meta = {k: v for k, v in manifest["modules"].items() if k.startswith(prefix)}
    if sorted(meta) != sorted(prefix + n for n in mods):
        raise state._error("progress.json", f"names modules {sorted(meta)} for layer {i}, the model has "
                                            f"{sorted(prefix + n for n in mods)}")
    tensors = state.load(fname)
    want = {}
    for name, m in meta.items():
        N, K = mods[name[len(prefix):]].weight.shape
        try:
            if any(k not in m for k in ("loss", "damp", "bits", "group_size", "sym")):
                raise ValueError("missing keys")
            check_group_size(m["group_size"], K)
        except ValueError:
            raise state._error("progress.json", f"has incomplete or invalid settings for {name}") from None
        G = 1 if m["group_size"] == -1 else K // m["group_size"]
        want.update({f"{name}.codes": (N, K), f"{name}.scales": (N, G), f"{name}.zeros": (N, G),
                     f"{name}.g_idx": (K,)})
    state.check(fname, tensors, want)
    return {name: rebuild(name, tensors, m) for name, m in meta.items()}


def resumed_streams(state: ResumeDir, layer: int, shard: int, first: list[Batch], gptaq: bool, device):
    """A shard's inputs of layer ``layer + 1`` (with the keyword arguments captured afresh in ``first``)."""
    fname = streams_file(layer, shard)
    streams = state.load(fname, device)
    kinds = ("q", "fp") if gptaq else ("q",)
    state.check(fname, streams, {f"{k}.{j}": b.hidden.shape for k in kinds for j, b in enumerate(first)})
    q = [Batch(streams[f"q.{j}"], b.kwargs) for j, b in enumerate(first)]
    fp = [Batch(streams[f"fp.{j}"], b.kwargs) for j, b in enumerate(first)] if gptaq else None
    return q, fp


__all__ = ["LayerHashes", "fingerprint", "rebuild", "run_hash", "result_tensors", "resumed_layer", "resumed_streams",
           "stream_tensors", "streams_file"]
