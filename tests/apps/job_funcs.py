"""Functions run by `call` jobs in tests/test_jobs.py: each appends what it saw, as one JSON line, to $JOB_OUT."""

import asyncio
import json
import os

KEYS = ("CLUSTERCTL_INSTANCE_TYPE", "CLUSTERCTL_JOB", "CLUSTERCTL_SCHEDULED_FOR", "CLUSTERCTL_PRIMARY_PID")


def _append(kind: str) -> None:
    record = {"kind": kind, "pid": os.getpid(), **{key: os.environ.get(key) for key in KEYS}}
    with open(os.environ["JOB_OUT"], "a") as out:
        out.write(json.dumps(record) + "\n")


def write_env() -> str:
    _append("sync")
    return "sync done"


async def write_env_async() -> str:
    await asyncio.sleep(0.01)
    _append("async")
    return "async done"


def explode() -> None:
    _append("explode")
    raise RuntimeError("boom on purpose")
