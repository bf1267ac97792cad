"""Statistics over every worker of the server, not only the one a statistics request reaches.

Each worker has its own batchers, and a client's statistics call may land on another worker than its
inference calls (HTTP clients open several connections; perf_analyzer then finds no version whose counters
moved). So each worker publishes a snapshot of its batchers' counters into the directory its server's workers
share, at most every ``PUBLISH_INTERVAL_S`` and only when they changed, and before it answers a statistics
request, which adds this worker's live counters to the other workers' latest snapshots. Another worker's
counters are at most ``PUBLISH_INTERVAL_S`` old, and the totals never go back between two answers from different
workers (adding live counters to snapshots that the other worker had outrun made them drop in 12-15 % of polls,
seen by an outside probe: tools that take deltas, perf_analyzer among them, got negative counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from serving.model_card import atomic_write

PUBLISH_INTERVAL_S = 0.25
Stats = dict[str, Any]  # DynamicBatcher.stats()


class SharedStats:
    def __init__(self, directory: Path, slot: int) -> None:
        self.directory, self.slot = directory, slot
        self._published: Any = None

    def _path(self, slot: int | str) -> Path:
        return self.directory / f"stats-{slot}.json"

    def publish(self, snapshot: dict[tuple[str, int], Stats]) -> bool:
        """Write this worker's counters per (model, version) unless they are what was written last."""
        if snapshot == self._published:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = [{"name": name, "version": version, "stats": stats} for (name, version), stats in snapshot.items()]
        # on the event loop, every PUBLISH_INTERVAL_S under load: atomic, but no fsync (the file lives as long as
        # the server's processes); orjson in one write: json.dump's pure-Python encoder and its many small writes
        # took 5.5 ms for five versions' counters (a stall of the loop four times a second), this 0.59 ms in all
        with atomic_write(self._path(self.slot), "wb", durable=False) as f:
            f.write(orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS))
        self._published = snapshot
        return True

    def others(self) -> dict[tuple[str, int], list[Stats]]:
        """The other workers' latest snapshots, per (model, version); unreadable ones are skipped."""
        found: dict[tuple[str, int], list[Stats]] = {}
        for path in self.directory.glob("stats-*.json"):
            if path == self._path(self.slot):
                continue
            try:
                rows = orjson.loads(path.read_bytes())
            except (OSError, ValueError):  # orjson.JSONDecodeError is a ValueError
                continue  # a worker that has not written yet, or a file from a crashed write
            for row in rows:
                found.setdefault((row["name"], row["version"]), []).append(row["stats"])
        return found


def add(a: Stats, b: Stats) -> Stats:
    """Counters of ``a`` and ``b`` summed (``last_inference_ms``: the later; batch sizes merged)."""
    total: Stats = {}
    for key, value in a.items():
        other = b.get(key)
        if key == "last_inference_ms":
            total[key] = max(value, other or 0)
        elif key == "batch_stats":
            sizes = {int(size): phases for size, phases in value.items()}
            for size, phases in (other or {}).items():
                size = int(size)
                sizes[size] = add(sizes[size], phases) if size in sizes else phases
            total[key] = sizes
        elif isinstance(value, dict):
            total[key] = add(value, other or {})
        else:
            total[key] = value + (other or 0)
    return total
