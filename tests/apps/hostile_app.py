"""ASGI app for the hostile tests: slow to import, forks grandchildren, or dies at import like an OOM kill.

`HOSTILE_IMPORT_SECONDS` delays the import (a heavy Django project); once the file named by
`HOSTILE_KILL_AT_IMPORT` exists, a worker SIGKILLs itself while importing, as the kernel's OOM killer would; `/fork` leaves a grandchild that
sleeps holding every inherited fd (the listening socket among them) and answers its pid.
"""

import json
import os
import signal
import time

from asgi_app import _send

time.sleep(float(os.environ.get("HOSTILE_IMPORT_SECONDS", "0")))
if os.path.exists(os.environ.get("HOSTILE_KILL_AT_IMPORT", "/nonexistent")):
    os.kill(os.getpid(), signal.SIGKILL)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/fork":
        child = os.fork()
        if child == 0:
            time.sleep(600)
            os._exit(0)
        await _send(send, 200, json.dumps({"grandchild": child, "pid": os.getpid()}).encode())
    else:
        await _send(send, 200, json.dumps({"pid": os.getpid()}).encode())
