"""Benchmark results are written whole or not at all."""

import json
import os
import resource
import signal
import stat
from contextlib import contextmanager

import pytest

from benchmarks.publish import write_results


def test_results_are_written_as_json_and_markdown(tmp_path):
    markdown = write_results("bench", {"rows": [1, 2]}, "# Bench\n", tmp_path / "results")
    assert markdown == "# Bench\n"
    assert json.loads((tmp_path / "results" / "bench.json").read_text()) == {"rows": [1, 2]}
    assert (tmp_path / "results" / "bench.md").read_text() == "# Bench\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["bench.json", "bench.md"]


@contextmanager
def disk_full_after(n_bytes: int):
    """Writes past ``n_bytes`` of any file fail (EFBIG) as on a full disk, whatever code does the writing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_that_fails_midway_keeps_the_previous_results(tmp_path):
    write_results("bench", {"rows": [1]}, "# old\n", tmp_path)
    with disk_full_after(64), pytest.raises(OSError, match="File too large"):
        write_results("bench", {"rows": list(range(1000))}, "# new\n", tmp_path)  # its JSON fails after 64 bytes
    assert json.loads((tmp_path / "bench.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "bench.md").read_text() == "# old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no temporary file left


def test_results_files_get_the_permissions_open_would_give(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_results("bench", {"rows": []}, "# Bench\n", tmp_path)
    for name in ("bench.json", "bench.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name  # readable by others too
