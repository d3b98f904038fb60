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

# The parent of every job process, in a bare interpreter (-S, ~10 ms): it leads the job's process
# group, runs the command as its child, and passes on its exit status. When the primary dies,
# however it dies, the kernel signals this process (PR_SET_PDEATHSIG) and it kills the whole
# group, so nothing a job started outlives the primary.
_LAUNCHER = """
import ctypes, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *_: os.killpg(0, signal.SIGKILL))
ctypes.CDLL(None).prctl(1, signal.SIGUSR1, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os.killpg(0, signal.SIGKILL)
child = os.fork()
if child == 0:
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        print(f"cannot run {sys.argv[2]!r}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
status = os.waitpid(child, 0)[1]
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code)
"""


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed | timed_out
    exit_code: int | None
    output: str


def argv_for(job: JobConfig) -> list[str]:
    if job.command:
        program = list(job.command)
    else:
        assert job.call is not None
        program = [sys.executable, "-m", "runtime.jobcall", job.call]
    return [sys.executable, "-S", "-c", _LAUNCHER, str(os.getpid()), *program]


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
