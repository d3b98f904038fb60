"""What our MetricsMiddleware adds to one request, with no server and no network: µs per call.

    python tests/bench/middleware_micro.py [--calls 20000] [--repeats 7]

Calls the demo app's `/` directly on a uvloop loop, as uvicorn's protocol would
(a receive that returns an empty request body, a send that does nothing), bare
and wrapped in `MetricsMiddleware` (as tests/bench/metrics_app.py wraps it).
The two alternate, `--repeats` times each; the figure for each is the fastest
repeat (the usual microbenchmark rule: slower repeats are other work getting
in the way). run.py sets the difference against what one plain uvicorn process
spends on a whole request to `/` (its CPU per request, figure e).
"""

from __future__ import annotations

import argparse
import time

import uvloop

from runtime.demo import app as bare
from runtime.metrics import RequestCounters
from runtime.worker import MetricsMiddleware


class NotDraining:
    draining = False


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict) -> None:
    pass


async def per_call_us(app, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await app(dict(SCOPE), receive, send)  # uvicorn builds a fresh scope for each request too
    return (time.perf_counter() - started) / calls * 1e6


async def main(calls: int, repeats: int) -> None:
    wrapped = MetricsMiddleware(bare, RequestCounters(), NotDraining())  # type: ignore[arg-type]
    await per_call_us(bare, calls // 10)  # warm-up
    await per_call_us(wrapped, calls // 10)
    times: dict[str, list[float]] = {"bare": [], "wrapped": []}
    for _ in range(repeats):
        times["bare"].append(await per_call_us(bare, calls))
        times["wrapped"].append(await per_call_us(wrapped, calls))
    low_bare, low_wrapped = min(times["bare"]), min(times["wrapped"])
    print(
        f"middleware micro: bare {low_bare:.2f} µs, with MetricsMiddleware {low_wrapped:.2f} µs,"
        f" added {low_wrapped - low_bare:.2f} µs per call (fastest of {repeats} x {calls} calls)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    uvloop.run(main(args.calls, args.repeats))
