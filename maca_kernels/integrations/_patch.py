"""Scoped monkey-patching for the integrations: every replaced attribute is put back exactly on undo."""

from __future__ import annotations

import contextlib
import warnings
from importlib import metadata

_MISSING = object()


class Patch:
    """Attributes replaced on classes or modules, restored in reverse order by ``undo``."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        # vars() keeps the raw attribute (a staticmethod stays a staticmethod when put back).
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def undo(self) -> None:
        """Restore every attribute; one that fails does not stop the others (the first error is raised after)."""
        error = None
        while self._saved:
            owner, name, old = self._saved.pop()
            try:
                if old is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, old)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error


@contextlib.contextmanager
def scoped(enable, disable, abandon):
    """``enable()`` inside, undone on exit. After a failure in the body, ``abandon()`` cleans up instead of
    ``disable()``, and an error of its own becomes a note on the original exception, which propagates unchanged
    (a cleanup error must not replace the real one, e.g. a missing extension)."""
    enable()
    try:
        yield
    except BaseException as exc:
        try:
            abandon()
        except Exception as cleanup:
            note = f"(while restoring the tool after this error, another one: {cleanup!r})"
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(note)
            else:
                warnings.warn(note, stacklevel=3)
        raise
    disable()


def check_version(dist: str, tested: tuple[str, ...]) -> str:
    """Warn (once per call) when the installed ``dist`` is not a tested release line (``"7.7"`` matches 7.7.x)."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError as e:
        raise ImportError(f"{dist} is not installed: this integration patches it") from e
    if not any(version == t or version.startswith(t + ".") for t in tested):
        warnings.warn(
            f"maca_kernels' {dist} backend was tested with {dist} {', '.join(tested)}; found {version}. "
            "It patches internals that may have changed: check the per-module losses against the tool's own.",
            stacklevel=3,
        )
    return version


def sequence_lengths(x, where: str) -> tuple:
    """A module input as (x2d [T, d], lengths): a 3-D batch [B, L, d] is B sequences of L tokens (the tools
    hand over unpadded rows), a 2-D [T, d] input is one sequence."""
    import torch

    if x.dim() == 3:
        B, L, d = x.shape
        return x.reshape(B * L, d), torch.full((B,), L, dtype=torch.int64)
    if x.dim() == 2:
        return x, torch.tensor([x.shape[0]], dtype=torch.int64)
    raise ValueError(f"{where}: expected a [B, L, d] or [T, d] layer input, got shape {tuple(x.shape)}")


def neutralized(W, H, damp: float) -> tuple:
    """(W, H_d, dead) as a GPTQ sweep sees them: dead columns (zero diag(H)) zeroed in W and set to 1 on H's
    diagonal, then damping ``damp``·mean(diag H) added. Copies; the tools report their losses against these."""
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    return W, H, dead
