"""The supervisor's failures that other layers name: kept apart so that a CLI command imports no supervisor."""

from __future__ import annotations


class BootError(Exception):
    """The first workers could not start (the app does not import, or dies at once)."""


class ReloadFailed(Exception):
    pass


class ReloadInterrupted(ReloadFailed):
    """The rolling restart was cut short because the cluster began to stop."""


class ReloadRefused(ReloadFailed):
    """The config file no longer validates: nothing changed, nothing restarted."""
