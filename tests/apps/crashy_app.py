"""Exits at import while the flag file exists: a crash loop the operator can switch on and off."""

import os
import sys
from pathlib import Path

if Path(os.environ["TEST_CRASH_FLAG"]).exists():
    print("crashy_app: flag present, exiting at import", file=sys.stderr)
    sys.exit(5)

from asgi_app import app  # noqa: E402,F401
