"""A small file of fixed-size slots, one per worker, memory-mapped by every worker of one server: how workers
share a few numbers (``serving.busy``, ``serving.connections``) without locks or a broker."""

from __future__ import annotations

import mmap
import os
from pathlib import Path


def map_slots(path: Path, slots: int, slot: int, slot_size: int) -> mmap.mmap:
    """The file at ``path``, created or grown to ``slots`` x ``slot_size`` bytes, mapped; ``slot`` is checked."""
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} is outside 0..{slots - 1}")
    size = slots * slot_size
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:  # every worker may get here first: they all grow it to the same size
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
