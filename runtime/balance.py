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

Only lasting connections are worth placing. While hundreds of connections a
second (`CHURN_RATE`) arrive at a worker and close within `CHURN` seconds on
average (clients or a proxy that open a connection per request), where one
lands does not last, and stepping aside would only cost time and system
calls (workers end up waiting for each other): such a worker never steps
aside, and lets uvloop's own server accept, in C, at a tenth of what a
connection costs the Python path. It looks at both figures every second.
(uvloop's server, out of file descriptors, closes the connections it cannot
hold rather than leaving them queued as the Python path's back-off does.)
The rate matters as well as the lifetime: a health check's short connections
among lasting ones say nothing about where the lasting ones should go.
"""

from __future__ import annotations

import mmap
import os

SLOTS = 1024  # worker processes at once, counting replacements during a rolling restart
OFF = -1  # a slot with no accepting worker
_SIZE = 4 * (1 + SLOTS)  # int32s: the number of slots in use (high-water mark), then a count per slot
SLACK = 1  # connections more than the least loaded that a worker may hold and still accept
DEFER = 0.002  # seconds a worker steps aside before it looks again
MAX_DEFER = 0.02  # ... and at most this long for any one connection
CHURN = 1.0  # seconds: connections that last less than this on average are not balanced
CHURN_RATE = 200.0  # new connections a second (per worker) that do not last: accepted by uvloop's server
LOOK_EVERY = 1.0  # seconds between two looks at those two figures
LIFETIME_WEIGHT = 1 / 16  # of each closed connection in the running average of their lifetimes


class ConnectionBoard:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        # The same memory as native ints: [high-water mark, slot 0, slot 1, ...], read on every accept.
        self._ints = memoryview(self._map).cast("i")

    @classmethod
    def create(cls) -> ConnectionBoard:
        fd = os.memfd_create("clusterctl-connections", 0)  # inheritable only where passed on purpose
        os.ftruncate(fd, _SIZE)
        board = cls(fd)
        for index in range(SLOTS):
            board.set(index, OFF)
        return board

    def claim(self, used: set[int]) -> int:
        """The lowest free slot (primary side)."""
        index = next(i for i in range(SLOTS) if i not in used)
        self.set(index, OFF)
        if index + 1 > self.high_water:
            self._ints[0] = index + 1
        return index

    @property
    def high_water(self) -> int:
        return self._ints[0]

    def set(self, index: int, value: int) -> None:
        self._ints[index + 1] = value

    def should_defer(self, index: int, mine: int) -> bool:
        """True when another accepting worker holds fewer than `mine - SLACK` connections."""
        ints = self._ints
        below = mine - SLACK
        for slot in range(1, ints[0] + 1):
            count = ints[slot]
            if 0 <= count < below and slot != index + 1:  # OFF is negative
                return True
        return False

    def close(self) -> None:
        self._ints.release()
        self._map.close()
        os.close(self.fd)
