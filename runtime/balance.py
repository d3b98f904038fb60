"""Connection balance: a board of open-connection counts that every worker can read.

With one shared listening socket, the kernel hands each new connection to
whichever worker reaches `accept()` first. Keep-alive clients then stay where
they landed, so a worker that was busy (or simply not scheduled: four workers
on two cores) during a burst of connects can end up with none of them.

The primary creates the board (a memfd of int32 counters, one per worker
process) and passes it to every worker. A worker keeps its own counter
current, and before accepting compares it with the others: when it already
holds more connections than the least loaded accepting worker (plus a little
slack), it steps aside for a moment so that worker can take the connection.
It never steps aside for long (`MAX_DEFER`), so a busy or stuck worker cannot
hold a connection in the queue.
"""

from __future__ import annotations

import mmap
import os
import struct

SLOTS = 1024  # worker processes at once, counting replacements during a rolling restart
OFF = -1  # a slot with no accepting worker
_HEADER = struct.Struct("i")  # the number of slots in use (high-water mark)
SLACK = 1  # connections more than the least loaded that a worker may hold and still accept
DEFER = 0.002  # seconds a worker steps aside before it looks again
MAX_DEFER = 0.02  # ... and at most this long for any one connection


class ConnectionBoard:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _HEADER.size + 4 * SLOTS)

    @classmethod
    def create(cls) -> ConnectionBoard:
        fd = os.memfd_create("clusterctl-connections", 0)  # inheritable only where passed on purpose
        os.ftruncate(fd, _HEADER.size + 4 * SLOTS)
        board = cls(fd)
        struct.pack_into(f"{SLOTS}i", board._map, _HEADER.size, *([OFF] * SLOTS))
        return board

    def claim(self, used: set[int]) -> int:
        """The lowest free slot (primary side)."""
        index = next(i for i in range(SLOTS) if i not in used)
        self.set(index, OFF)
        if index + 1 > self.high_water:
            _HEADER.pack_into(self._map, 0, index + 1)
        return index

    @property
    def high_water(self) -> int:
        return _HEADER.unpack_from(self._map, 0)[0]

    def set(self, index: int, value: int) -> None:
        struct.pack_into("i", self._map, _HEADER.size + 4 * index, value)

    def should_defer(self, index: int, mine: int) -> bool:
        """True when another accepting worker holds fewer than `mine - SLACK` connections."""
        counts = struct.unpack_from(f"{self.high_water}i", self._map, _HEADER.size)
        least = min((c for i, c in enumerate(counts) if c != OFF and i != index), default=None)
        return least is not None and mine > least + SLACK

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
