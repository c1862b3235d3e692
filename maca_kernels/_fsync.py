"""Durability helpers shared by the checkpoint writer and the resume state."""

from __future__ import annotations

import contextlib
import os


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
