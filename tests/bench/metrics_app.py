"""The demo app wrapped in our `MetricsMiddleware`, for benchmark f (the middleware's cost).

run.py serves this with one plain uvicorn process (`uvicorn metrics_app:app`,
with tests/bench on PYTHONPATH) and compares it with the same uvicorn command
serving `runtime.demo:app` itself. The only difference between the two is the
middleware our workers put around every app. It gets what a worker gives it:
a `RequestCounters` and an object whose `draining` is False. A worker that
is not draining reads only that one attribute.
"""

from runtime.demo import app as demo_app
from runtime.metrics import RequestCounters
from runtime.worker import MetricsMiddleware


class NotDraining:
    draining = False


counters = RequestCounters()
app = MetricsMiddleware(demo_app, counters, NotDraining())  # type: ignore[arg-type]
