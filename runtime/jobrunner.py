"""Running one attempt of one job: a command, a Python callable in a child interpreter, or an HTTP call.

Child processes get their own session, so a timeout ends the whole process
group, and ask the kernel to SIGKILL them if the primary dies, so a job never
outlives the primary that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

import httpx

from .config import JobConfig

OUTPUT_TAIL = 16 * 1024  # bytes of output kept per attempt
TERM_GRACE = 2.0

# Runs before the job's own program, in a bare interpreter (-S: ~10 ms): sets the parent-death
# signal, which survives exec, then becomes the command.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(70)\n"
    "try:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n    print(f'cannot run {sys.argv[2]!r}: {e.strerror}', file=sys.stderr); os._exit(127)\n"
)


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed | timed_out
    exit_code: int | None
    output: str


def argv_for(job: JobConfig) -> list[str]:
    if job.command:
        return [sys.executable, "-S", "-c", _LAUNCHER, str(os.getpid()), *job.command]
    assert job.call is not None
    return [sys.executable, "-m", "runtime.jobcall", job.call]


async def run_attempt(job: JobConfig, env: dict[str, str], http: httpx.AsyncClient | None = None) -> Outcome:
    if job.http is not None:
        return await _run_http(job, http)
    return await _run_process(job, env)


async def _run_process(job: JobConfig, env: dict[str, str]) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        *argv_for(job),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    tail = bytearray()

    async def collect() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            tail.extend(chunk)
            del tail[:-OUTPUT_TAIL]

    reader = asyncio.create_task(collect())
    try:
        async with asyncio.timeout(job.timeout):
            await proc.wait()
            await reader
    except TimeoutError:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        reader.cancel()
        return Outcome("timed_out", proc.returncode, _text(tail) + f"\n[timed out after {job.timeout:g}s]")
    except asyncio.CancelledError:
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TERM_GRACE):
                await proc.wait()
        _kill_group(proc.pid, signal.SIGKILL)
        reader.cancel()
        raise
    code = proc.returncode
    return Outcome("succeeded" if code == 0 else "failed", code, _text(tail))


async def _run_http(job: JobConfig, client: httpx.AsyncClient | None) -> Outcome:
    assert job.http is not None
    spec = job.http
    own = client is None
    client = client or httpx.AsyncClient()
    try:
        response = await client.request(
            str(spec.get("method", "POST")).upper(),
            spec["url"],
            headers=spec.get("headers"),
            content=spec.get("body"),
            timeout=job.timeout,
        )
    except httpx.TimeoutException:
        return Outcome("timed_out", None, f"{spec['url']}: no answer within {job.timeout:g}s")
    except httpx.HTTPError as exc:
        return Outcome("failed", None, f"{spec['url']}: {type(exc).__name__}: {exc}")
    finally:
        if own:
            await client.aclose()
    body = response.text[-OUTPUT_TAIL:]
    ok = 200 <= response.status_code < 300
    return Outcome("succeeded" if ok else "failed", response.status_code, f"HTTP {response.status_code}\n{body}")


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _text(data: bytearray) -> str:
    return bytes(data).decode("utf-8", "replace")
