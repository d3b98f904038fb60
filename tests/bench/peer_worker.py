"""The gunicorn worker class the benchmark gives the peer: uvicorn with httptools and uvloop, explicitly.

`uvicorn_worker.UvicornWorker` asks for `loop="auto", http="auto"`, which picks
the same pair when both are installed; naming them makes the comparison with
our workers (httptools + uvloop) exact instead of depending on what is installed.
"""

from uvicorn_worker import UvicornWorker


class HttptoolsUvloopWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools"}
