"""The directory one server's workers share (serving/shared_slots.py): never an earlier server's, and what
servers no longer running left behind is removed."""

from __future__ import annotations

import os
import subprocess
import sys

from serving.shared_slots import _start_time, server_dir


def test_the_directory_is_the_parents_and_earlier_servers_directories_go(tmp_path):
    parent, me = os.getppid(), os.getpid()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    gone = int(finished.stdout)
    earlier = tmp_path / f"cnnserve-{parent}-{_start_time(parent) - 1}"  # a server before, under the same PID
    dead = tmp_path / f"cnnserve-{gone}-5"
    running = tmp_path / f"cnnserve-{me}-{_start_time(me)}"  # another server, still running
    unrelated = [tmp_path / "cnnserve-train-build.log", tmp_path / "cnnserve-123"]
    for path in (earlier, dead, running, *unrelated):
        path.mkdir()
        (path / "unloaded.json").write_text('["mnist-cnn"]')

    mine = server_dir(tmp_path)

    assert mine == tmp_path / f"cnnserve-{parent}-{_start_time(parent)}"
    assert not earlier.exists() and not dead.exists()
    assert running.exists() and all(path.exists() for path in unrelated)
