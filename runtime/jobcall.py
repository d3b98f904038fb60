"""`python -m runtime.jobcall MODULE:FUNCTION`: a `call` job, in its own interpreter on the primary.

A child process, so a slow or blocking function can never stall the primary's loop,
and a timeout can end it. Async functions are run to completion.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import inspect
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    target = sys.argv[1]
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.environ.get("CLUSTERCTL_PRIMARY_PID") != str(os.getppid()):
        sys.exit(70)  # the primary died before we could ask to die with it
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, os.getcwd())
    function = importlib.import_module(module_name)
    for part in attr.split("."):
        function = getattr(function, part)
    result = function()
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    if result is not None:
        print(result)


async def _await(awaitable):  # type: ignore[no-untyped-def]
    return await awaitable


if __name__ == "__main__":
    main()
