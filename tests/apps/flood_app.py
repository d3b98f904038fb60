"""ASGI app whose workers write to stdout flat out from a thread, from import on (a debug print left in a loop)."""

import os
import threading

from asgi_app import app  # noqa: F401

LINE = b"flooding the primary with output, line after line after line after line\n"


def _flood() -> None:
    chunk = LINE * 512
    while True:
        os.write(1, chunk)


threading.Thread(target=_flood, daemon=True).start()
