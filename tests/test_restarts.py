"""The crash-loop policy with a fake clock and a fake OOM counter (the real-process cases are in test_faults)."""

from __future__ import annotations

import signal

from runtime.restarts import BACKOFF_CAP, OUTSIDE_KILLS_TOLERATED, STABLE_AFTER, RestartPolicy

KILLED = -signal.SIGKILL


class Machine:
    def __init__(self) -> None:
        self.now = 1000.0
        self.ooms = 0

    def policy(self) -> RestartPolicy:
        return RestartPolicy(clock=lambda: self.now, oom=lambda: self.ooms)


def test_a_crash_after_a_stable_run_is_replaced_at_once() -> None:
    m = Machine()
    policy = m.policy()
    m.now += STABLE_AFTER + 1
    assert policy.died(1, killed_by_us=False, ready_at=m.now - STABLE_AFTER - 1, boot_error=False) == 0


def test_a_crash_loop_backs_off_exponentially_up_to_the_cap() -> None:
    m = Machine()
    policy = m.policy()
    delays = []
    for _ in range(12):
        policy.spawned()
        m.now += 0.5
        delays.append(policy.died(1, killed_by_us=False, ready_at=m.now - 0.2, boot_error=False))
        m.now += delays[-1]
    assert delays[0] == 0  # one early death may be bad luck
    assert delays[1:5] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == BACKOFF_CAP


def test_an_app_that_cannot_load_backs_off_at_once() -> None:
    m = Machine()
    assert m.policy().died(3, killed_by_us=False, ready_at=None, boot_error=True) > 0


def test_outside_kills_of_serving_workers_are_forgiven_up_to_a_budget() -> None:
    m = Machine()
    policy = m.policy()
    delays = []
    for _ in range(OUTSIDE_KILLS_TOLERATED + 3):
        policy.spawned()
        m.now += 1.0  # chaos: a ready worker killed every second
        delays.append(policy.died(KILLED, killed_by_us=False, ready_at=m.now - 0.5, boot_error=False))
    assert delays[:OUTSIDE_KILLS_TOLERATED] == [0] * OUTSIDE_KILLS_TOLERATED
    assert delays[-1] > 0  # past the budget, even outside kills are a loop


def test_oom_kills_are_a_crash_loop_at_whatever_rate_the_kernel_kills() -> None:
    m = Machine()
    policy = m.policy()
    delays = []
    for _ in range(4):
        policy.spawned()
        m.now += 3.0
        m.ooms += 1  # the kernel's OOM killer acted while this worker lived
        delays.append(policy.died(KILLED, killed_by_us=False, ready_at=m.now - 1.0, boot_error=False))
        m.now += delays[-1]
    assert delays == [0, 0.5, 1.0, 2.0]


def test_a_sigkill_before_ready_is_not_forgiven() -> None:
    m = Machine()
    policy = m.policy()
    policy.died(KILLED, killed_by_us=False, ready_at=None, boot_error=False)
    assert policy.died(KILLED, killed_by_us=False, ready_at=None, boot_error=False) > 0
