"""Which workers of this server ran a model lately, shared through a small memory-mapped file, so that a
request finding the whole server idle may use every core (``serving.batcher``, ``run_wide``).

One slot per worker holding ``time.monotonic()`` (one clock for every process of the machine) of its last
run's end, or infinity while it runs. Reads and writes are 8-byte stores in shared memory, no locks: a race
costs at most one run with more threads than free cores, never a wrong answer.
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

from serving.shared_slots import map_slots

SLOT = struct.Struct("d")
QUIET_S = 0.005  # another worker counts as idle once it has run nothing for this long


class BusyBoard:
    def __init__(self, path: Path, slots: int, slot: int) -> None:
        self._map = map_slots(path, slots, slot, SLOT.size)
        self.slot, self.slots = slot, slots

    def running(self, busy: bool) -> None:
        """Mark this worker running a model (True) or done with it now (False)."""
        SLOT.pack_into(self._map, self.slot * SLOT.size, math.inf if busy else time.monotonic())

    def all_idle(self, quiet_s: float = QUIET_S) -> bool:
        """True when this worker runs no model now (another version's batcher may be running, with every core's
        threads too) and no other worker runs one or has run one in the last ``quiet_s``."""
        since = time.monotonic() - quiet_s
        for i in range(self.slots):
            last = SLOT.unpack_from(self._map, i * SLOT.size)[0]
            if last == math.inf or (i != self.slot and last >= since):
                return False
        return True

    def close(self) -> None:
        SLOT.pack_into(self._map, self.slot * SLOT.size, 0.0)
        self._map.close()
