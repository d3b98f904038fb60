"""What the primary and its workers agree on: how a worker is started, checked and how it exits.

Kept apart from `runtime.worker` so the primary never imports the worker's
module (a worker runs it as `__main__`).
"""

from __future__ import annotations

SPEC_ENV = "CLUSTERCTL_WORKER_SPEC"  # JSON: target, interface, fds, timings
EXIT_BOOT_ERROR = 3  # the app could not be loaded; retrying right away will not help
EXIT_PRIMARY_GONE = 70


def health_socket_name(primary_pid: int, worker_pid: int) -> str:
    """Abstract unix socket (no file to clean up) on which a worker answers the primary's health check."""
    return f"\0clusterctl/{primary_pid}/{worker_pid}/health"
