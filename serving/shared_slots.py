"""Files shared by the workers of one server, without locks or a broker: the server's directory
(``server_dir``), and small files of fixed-size slots, one per worker, memory-mapped by every worker
(``map_slots``: ``serving.busy``, ``serving.connections``)."""

from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

_SERVER_DIR = re.compile(r"cnnserve-(\d+)-(\d+)")


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc); 0 where /proc is missing; None when
    there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():  # no /proc (macOS): liveness only
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return 0
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the name before ")" may hold spaces


def server_dir(root: Path | None = None) -> Path:
    """The directory the workers of this server share, under ``root`` (default: the temp directory), named
    after their parent (the BentoML arbiter) and its start time: a later server whose arbiter gets the same
    PID (a restarted container keeps /tmp when it is a pod's emptyDir, and PIDs there repeat) never reads an
    earlier server's files. Directories of servers no longer running are removed on the way."""
    root = Path(tempfile.gettempdir()) if root is None else root
    parent = os.getppid()
    mine = root / f"cnnserve-{parent}-{_start_time(parent) or 0}"
    for path in root.glob("cnnserve-*-*"):
        match = _SERVER_DIR.fullmatch(path.name)
        if match and path != mine and _start_time(int(match[1])) != int(match[2]):
            shutil.rmtree(path, ignore_errors=True)
    return mine


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
