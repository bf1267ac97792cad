"""HTTP connections spread over the workers of one server.

The workers accept HTTP connections from one shared listening socket, and the worker that wakes first accepts
everything waiting: a client (or load balancer) opening its pool of 16 connections at once put all 16 on one
worker, five starts out of five, while the other idled (about half the throughput). ``ConnectionShare`` keeps
each worker's count of open connections in a small memory-mapped file; a worker holding more than its share
(the total over the workers, rounded up) answers the next request of a connection with ``Connection: close``
(``serving.uvicorn_hooks.install_connection_balance``), and the client reconnects, usually to a less busy worker,
which wins the race to accept while the busy one is working. Counts are 8-byte stores, one slot per worker, no
locks: a race costs at most one reconnection too many or too few.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from serving.shared_slots import map_slots

SLOT = struct.Struct("q")


class ConnectionShare:
    def __init__(self, path: Path, slots: int, slot: int) -> None:
        self._map = map_slots(path, slots, slot, SLOT.size)
        self.slot, self.slots, self.open = slot, slots, 0
        self.closing: set[object] = set()  # connections answered with Connection: close, not closed yet
        self._publish()

    def _publish(self) -> None:
        if not self._map.closed:  # connections still closing after close() count for nobody
            SLOT.pack_into(self._map, self.slot * SLOT.size, self.open - len(self.closing))

    def opened(self, peer: object) -> None:
        self.open += 1
        self._publish()

    def closed(self, peer: object) -> None:
        self.open -= 1
        self.closing.discard(peer)
        self._publish()

    def hand_back(self, peer: object) -> bool:
        """Whether the connection from ``peer`` should be closed after this response: True (and it counts as closed
        from now on) while this worker keeps more than the total over the workers divided evenly, rounded up."""
        if peer in self.closing:
            return True
        # this worker's open connections all count (those handed back reconnect somewhere), the others' as published
        total = self.open + sum(max(0, SLOT.unpack_from(self._map, i * SLOT.size)[0])
                                for i in range(self.slots) if i != self.slot)
        if self.open - len(self.closing) <= math.ceil(total / self.slots):
            return False
        self.closing.add(peer)
        self._publish()
        return True

    def close(self) -> None:
        SLOT.pack_into(self._map, self.slot * SLOT.size, 0)
        self._map.close()
