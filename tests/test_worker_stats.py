"""Statistics shared between workers (serving/worker_stats.py) and the board of busy workers (serving/busy.py)."""

from __future__ import annotations

import time

from serving.busy import BusyBoard
from serving.worker_stats import SharedStats, add


def stats(success: int, execs: int, last_ms: int, batch: dict) -> dict:
    return {"inference_count": success, "execution_count": execs, "success": {"count": success, "ns": 10 * success},
            "last_inference_ms": last_ms, "batch_stats": batch}


def test_add_sums_counters_merges_batch_sizes_and_keeps_the_latest_time():
    a = stats(3, 2, 100, {1: {"compute_infer": {"count": 1, "ns": 5}}})
    b = stats(4, 1, 250, {"1": {"compute_infer": {"count": 2, "ns": 7}}, "8": {"compute_infer": {"count": 1, "ns": 9}}})
    total = add(a, b)
    assert (total["inference_count"], total["execution_count"], total["success"]) == (7, 3, {"count": 7, "ns": 70})
    assert total["last_inference_ms"] == 250
    assert total["batch_stats"] == {1: {"compute_infer": {"count": 3, "ns": 12}},
                                    8: {"compute_infer": {"count": 1, "ns": 9}}}


def test_each_worker_reads_the_others_snapshots_not_its_own(tmp_path):
    first, second = SharedStats(tmp_path, 0), SharedStats(tmp_path, 1)
    assert first.publish({("m", 1): stats(1, 1, 5, {})})
    assert not first.publish({("m", 1): stats(1, 1, 5, {})}), "an unchanged snapshot was written again"
    second.publish({("m", 1): stats(2, 2, 6, {}), ("m", 2): stats(3, 1, 7, {})})
    assert first.others() == {("m", 1): [stats(2, 2, 6, {})], ("m", 2): [stats(3, 1, 7, {})]}
    assert second.others() == {("m", 1): [stats(1, 1, 5, {})]}
    (tmp_path / "stats-2.json").write_text("{not json")  # a crashed write is skipped
    assert len(second.others()) == 1


def test_publishing_never_waits_for_the_disk(tmp_path, monkeypatch):
    """Workers publish on their event loop every quarter second under load: the file is replaced atomically, but
    never fsync'd (a stall of the loop for as long as the disk takes; the file lives only as long as the server)."""
    def no_fsync(fd: int) -> None:
        raise AssertionError("SharedStats.publish called fsync")

    monkeypatch.setattr("os.fsync", no_fsync)
    first, second = SharedStats(tmp_path, 0), SharedStats(tmp_path, 1)
    assert first.publish({("m", 1): stats(1, 1, 5, {})})
    assert second.others() == {("m", 1): [stats(1, 1, 5, {})]}
    assert [p.name for p in tmp_path.iterdir()] == ["stats-0.json"], "the temporary file was left behind"


def test_busy_board_tells_whether_every_worker_is_idle(tmp_path):
    mine, other = BusyBoard(tmp_path / "busy", 2, 0), BusyBoard(tmp_path / "busy", 2, 1)
    assert mine.all_idle() and other.all_idle()
    other.running(True)
    assert not mine.all_idle(), "a running worker counts as idle"
    assert not other.all_idle(), "a worker running a model (another version's batcher) counts as idle to itself"
    other.running(False)
    assert other.all_idle(quiet_s=60), "a worker's own finished run is no other worker's load"
    assert not mine.all_idle(quiet_s=60), "a worker that just finished counts as idle"
    time.sleep(0.01)
    assert mine.all_idle(quiet_s=0.005)
    other.close()
    mine.close()
