"""`python -m runtime.jobcall MODULE:FUNCTION`: a `call` job, in its own interpreter on the primary.

A child process (under the job launcher, see `runtime.jobrunner`), so a slow or blocking
function can never stall the primary's loop, and a timeout can end it. Async functions are
run to completion.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys


def main() -> None:
    target = sys.argv[1]
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
