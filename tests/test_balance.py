"""The connection board's rule, on a real board (a memfd shared as workers share it)."""

from __future__ import annotations

import os

from runtime.balance import OFF, SLACK, ConnectionBoard


def test_a_worker_steps_aside_only_for_an_accepting_worker_with_fewer_connections_than_it_by_more_than_the_slack():
    board = ConnectionBoard.create()
    try:
        me, other, off = board.claim(set()), board.claim({0}), board.claim({0, 1})
        assert (me, other, off) == (0, 1, 2) and board.high_water == 3
        board.set(off, OFF)  # not accepting (draining, or not ready yet): never waited for
        board.set(other, 5)
        assert not board.should_defer(me, 5)
        assert not board.should_defer(me, 5 + SLACK)
        assert board.should_defer(me, 5 + SLACK + 1)
        board.set(other, OFF)
        assert not board.should_defer(me, 100)  # alone: nobody to step aside for
        board.set(other, 0)
        assert board.should_defer(me, SLACK + 1)
        board.set(me, 0)  # its own slot is not compared with itself
        assert not board.should_defer(me, SLACK)
    finally:
        board.close()


def test_another_process_sees_the_counts_a_worker_publishes():
    board = ConnectionBoard.create()
    try:
        me, other = board.claim(set()), board.claim({0})
        board.set(me, 0)
        seen = ConnectionBoard(os.dup(board.fd))  # as a worker maps the descriptor it is given
        try:
            seen.set(other, 7)
            assert board.should_defer(other, 7) and not board.should_defer(me, 7)
            assert seen.high_water == 2
        finally:
            seen.close()
    finally:
        board.close()
