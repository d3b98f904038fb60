"""A plain WSGI app (no framework): answers the length and sha256 of `wsgi.input.read()`.

It also says on stderr what the read gave it, so a test can see what happened to a request
whose client never waits for the answer.
"""

import hashlib
import json
import sys


def app(environ, start_response):
    try:
        body = environ["wsgi.input"].read()
    except OSError as exc:
        print(f"wsgi_app: reading the body failed: {exc}", file=sys.stderr, flush=True)
        raise
    print(f"wsgi_app: read {len(body)} bytes", file=sys.stderr, flush=True)
    answer = json.dumps({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]
