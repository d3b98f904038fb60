"""Breaks the worker's inherited listening socket at import while `TEST_BREAK_FLAG` exists, then serves asgi_app.

`TEST_BREAK_MODE=close` closes the fd (an app that closes every fd it did not open);
`replace` puts a socket that is not listening on the same fd number (an app that dup2()s
its own socket onto a low fd).
"""

import json
import os
import socket
from pathlib import Path

_kept: list[socket.socket] = []

if Path(os.environ["TEST_BREAK_FLAG"]).exists():
    for fd in json.loads(os.environ["CLUSTERCTL_WORKER_SPEC"])["listen_fds"]:
        if os.environ["TEST_BREAK_MODE"] == "close":
            os.close(fd)
        else:
            other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            os.dup2(other.fileno(), fd)
            _kept.append(other)

from asgi_app import app  # noqa: E402,F401
