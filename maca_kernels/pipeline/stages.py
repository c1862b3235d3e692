"""A decoder layer's forward on each calibration micro-batch, run once for the whole layer and paused where each
group of modules begins (true-sequential quantization without re-running the layer from its start for each group).

Each micro-batch's forward runs in a thread of its own, paused by a pre-hook on each group's entry module; the
pipeline collects every micro-batch's input of a group, quantizes the group in place, and lets the forwards run on
to the next group, whose input then comes from the quantized modules, as a fresh forward would give it. Only one
thread runs at a time (a strict hand-off), each does the arithmetic a fresh forward would do, in the same order, so
the bits equal re-running the layer per group (``Replay``, kept for activations waiting in host memory: paused
forwards hold their intermediate tensors on the device). The layer's output for the next layer is the end of the
same forward.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from torch import nn

from .activations import keep, use
from .model import Batch, call_of, first

Call = tuple[tuple, dict]  # what a module is called with: (args, kwargs)

_running = threading.local()  # the _Paused whose thread this is


class _Cancel(BaseException):
    """Raised inside a paused forward to unwind it (the run stopped early)."""


class _Paused:
    """One forward in its own thread, paused at the first call of each stop module. The thread takes the caller's
    per-thread torch state that decides the arithmetic: grad mode (off), the current CUDA device and the default
    device."""

    def __init__(self, fn, device: torch.device):
        self._fn = fn
        self._device = device
        self._default = torch.get_default_device()
        self._go: queue.Queue = queue.Queue(maxsize=1)
        self._back: queue.Queue = queue.Queue(maxsize=1)
        self.seen: set[int] = set()
        self.done = self.closing = False
        self._thread = threading.Thread(target=self._main, daemon=True, name="maca-layer-forward")
        self._thread.start()

    def _main(self) -> None:
        _running.run = self
        if self._go.get() == "cancel":
            self._back.put(("cancelled", None))
            return
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            torch.set_default_device(self._default)
            with torch.no_grad():
                out = self._fn()
            self._back.put(("done", out))
        except _Cancel:
            self._back.put(("cancelled", None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            self._back.put(("error", err))

    def pause(self, module: nn.Module, call: Call) -> None:
        """In the forward's thread: hand ``call`` over and wait to be let go on."""
        if self.closing:
            raise _Cancel
        self._back.put(("at", (module, call)))
        if self._go.get() == "cancel":
            raise _Cancel

    def resume(self):
        """Let the forward run to its next stop (or its end): ("at", (module, call)) or ("done", output)."""
        if self.done:
            raise RuntimeError("the layer's forward on this micro-batch has already ended")
        self._go.put("go")
        kind, got = self._back.get()
        self.done = kind != "at"
        if kind == "error":
            raise got
        return kind, got

    def cancel(self) -> None:
        """Unwind the forward wherever it is (paused, running on to its next stop, or finished)."""
        self.closing = True
        if not self.done:
            self._go.put("cancel")  # read by a paused forward, or by none if it has already ended
            while self._thread.is_alive():  # a Ctrl-C may have taken its last message: never wait on a dead thread
                try:
                    self._back.get(timeout=0.1)
                    break
                except queue.Empty:
                    pass
            self.done = True
        self._thread.join()


def _stop_hook(module, args, kwargs):
    run = getattr(_running, "run", None)
    if run is not None and id(module) not in run.seen:
        run.seen.add(id(module))
        run.pause(module, (args, kwargs))


class Stages:
    """The layer's forward on every micro-batch (``streams``: shard → batches), paused at each module of ``stops``
    (the groups' entry modules, in forward order)."""

    def __init__(self, layer: nn.Module, streams: dict[int, list[Batch]], stops: list[nn.Module],
                 device: torch.device, store: torch.device | None):
        self.streams, self.store = streams, store
        self._hooks = [m.register_forward_pre_hook(_stop_hook, with_kwargs=True) for m in stops]
        self._runs: dict[tuple[int, int], _Paused] = {}
        try:
            for s, bs in streams.items():
                for bi, b in enumerate(bs):
                    self._runs[s, bi] = _Paused(lambda b=b: first(layer(use(b, device).hidden, **b.kwargs)), device)
        except BaseException:
            self.close()
            raise

    def calls(self, module: nn.Module) -> Iterator[tuple[int, int, Call]]:
        """(shard, batch, the call of ``module``) for every micro-batch, each forward run on to ``module``."""
        for (s, bi), run in self._runs.items():
            kind, got = run.resume()
            if kind != "at" or got[0] is not module:
                raise RuntimeError(f"the layer's forward reached {type(got[0]).__name__ if kind == 'at' else 'its end'}"
                                   f" before {type(module).__name__}: its groups are not in forward order")
            yield s, bi, got[1]

    def outputs(self) -> dict[int, list[Batch]]:
        """Every forward run to its end: the next layer's inputs, kept where the streams wait."""
        out: dict[int, list[Batch]] = {}
        for (s, bi), run in self._runs.items():
            kind, got = run.resume()
            if kind != "done":
                raise RuntimeError(f"the layer's forward stopped again at {type(got[0]).__name__} after its last group")
            out.setdefault(s, []).append(Batch(keep(got, self.store), self.streams[s][bi].kwargs))
        return out

    def close(self) -> None:
        try:
            for run in self._runs.values():
                run.cancel()
        finally:
            for h in self._hooks:
                h.remove()


class Replay:
    """The same interface by running the layer afresh up to each group (nothing held between groups)."""

    def __init__(self, layer: nn.Module, streams: dict[int, list[Batch]], device: torch.device,
                 store: torch.device | None):
        self.layer, self.streams, self.device, self.store = layer, streams, device, store

    def calls(self, module: nn.Module) -> Iterator[tuple[int, int, Call]]:
        for s, bs in self.streams.items():
            for bi, b in enumerate(bs):
                yield s, bi, call_of(self.layer, module, use(b, self.device))

    def outputs(self) -> dict[int, list[Batch]]:
        return {s: [Batch(keep(first(self.layer(use(b, self.device).hidden, **b.kwargs)), self.store), b.kwargs)
                    for b in bs] for s, bs in self.streams.items()}

    def close(self) -> None:
        pass


__all__ = ["Call", "Replay", "Stages"]
