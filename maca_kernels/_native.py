"""The optional C++ extension ``maca_kernels._C`` (CPU kernels)."""

from __future__ import annotations

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def require_native(op: str):
    if _C is None:
        raise RuntimeError(
            f"{op}: the CPU path needs the C++ extension maca_kernels._C, which failed to import "
            f"({_IMPORT_ERROR}). Build it with `make build` (or `pip install --no-build-isolation -e .`)."
        )
    return _C
