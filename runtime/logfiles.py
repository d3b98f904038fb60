"""`clusterctl-tui logs`: the workers' output, read back from `logs/workers.log` beside the store.

Each line of the file is `<date> <time>,<ms> w<slot>[<pid>] <stream>| <text>` (see `runtime.logs`);
it is printed as `w<slot>[<pid>] <text>`, the same prefix the headless primary writes to stderr,
so what an operator greps for is the same in journalctl and here. The stream is left out: it is
in the file, and a traceback reads the same from either. clusterctl's own notes in the file
(`clusterctl: N worker output lines dropped ...`) are printed without their timestamp, whatever
`--worker` says, because they tell that lines are missing; lines of any other shape (an older
version's) are printed as they are, unless `--worker` asks for one slot.

`-n N` reads back through the rotated files (`.1` to `.BACKUPS`) when the current one holds fewer
matching lines. `-f` then follows the file by polling, like `tail -F`: a new inode (rotated) or a
file shorter than what was read (truncated) is reopened from its start.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .logs import BACKUPS

EXIT_BAD_INPUT = 2
FOLLOW_INTERVAL = 0.1  # seconds between looks at the file while following
BLOCK = 64 * 1024

_WORKER_LINE = re.compile(r"\S+ \S+ (w(\d+)\[\d+\]) [a-z]+\| (.*)", re.DOTALL)
_NOTE_LINE = re.compile(r"\S+ \S+ (clusterctl: .*)", re.DOTALL)


def run_logs(store_path: Path, lines: int, follow: bool, worker: int | None) -> int:
    """Print the last `lines` worker output lines (of slot `worker`, if given), then follow if asked.

    Returns the exit status: 0, or 2 with one line on stderr when there is nothing to read.
    A closed stdout (`| head`) and Ctrl+C end it quietly with 0.
    """
    path = store_path.parent / "logs" / "workers.log"
    if lines < 0:
        return _fail(f"logs: -n expects a number of lines, 0 or more, got {lines}")
    if not store_path.parent.is_dir():
        return _fail(f"no store directory at {store_path.parent} (has a primary ever run here?)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _fail(f"no worker output yet at {path}")
    except OSError as exc:
        return _fail(f"cannot read {path}: {exc.strerror or exc}")
    try:
        end = _complete_end(fd, os.fstat(fd).st_size)
        sys.stdout.write("".join(_last(path, fd, end, lines, worker)))
        sys.stdout.flush()
        if follow:
            _follow(path, fd, end, worker)
    except BrokenPipeError:
        # Whoever read our output has gone; stdout goes to devnull so the exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        pass
    finally:
        os.close(fd)
    return 0


def _fail(message: str) -> int:
    print(f"clusterctl-tui: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _render(raw: bytes, worker: int | None) -> str | None:
    """One line of the file as printed (with its newline), or None when `worker` filters it out."""
    text = raw.decode("utf-8", "replace")
    if match := _WORKER_LINE.fullmatch(text):
        prefix, slot, rest = match.groups()
        return None if worker is not None and int(slot) != worker else f"{prefix} {rest}\n"
    if match := _NOTE_LINE.fullmatch(text):
        return f"{match.group(1)}\n"
    return None if worker is not None else f"{text}\n"


def _last(path: Path, fd: int, end: int, count: int, worker: int | None) -> list[str]:
    """The last `count` lines to print: from the open current file up to `end`, then the rotated ones."""
    found: list[str] = []
    if count == 0:
        return found
    for n in range(BACKUPS + 1):
        if n == 0:
            source, size = fd, end
        else:
            try:
                source = os.open(f"{path}.{n}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            size = _complete_end(source, os.fstat(source).st_size)
        try:
            for raw in _reversed_lines(source, size):
                text = _render(raw, worker)
                if text is not None:
                    found.append(text)
                    if len(found) == count:
                        return found[::-1]
        finally:
            if source != fd:
                os.close(source)
    return found[::-1]


def _complete_end(fd: int, size: int) -> int:
    """The offset just past the last newline: a line still being written is left for following."""
    pos = size
    while pos > 0:
        start = max(0, pos - BLOCK)
        newline = os.pread(fd, pos - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0


def _reversed_lines(fd: int, end: int) -> Iterator[bytes]:
    """The lines of the file before `end` (0, or just past a newline), last first, without their newlines."""
    if end == 0:
        return
    pos = end - 1  # the newline that ends the last line
    rest = b""
    while pos > 0:
        start = max(0, pos - BLOCK)
        first, *pieces = (os.pread(fd, pos - start, start) + rest).split(b"\n")
        yield from reversed(pieces)
        rest, pos = first, start
    yield rest


def _follow(path: Path, fd: int, pos: int, worker: int | None) -> None:
    """Print lines as they are appended to `path`, from `pos` of the open `fd`, across rotation; until Ctrl+C.

    `fd` keeps its number when the file is reopened (dup2), so the caller still closes the right one.
    """
    inode = os.fstat(fd).st_ino
    partial = b""
    rotated = False
    while True:
        chunk = os.pread(fd, BLOCK, pos)
        if chunk:
            pos += len(chunk)
            *complete, partial = (partial + chunk).split(b"\n")
            _print(complete, worker)
            continue
        if rotated:  # the old file is read to its end: go on with the new one
            _print([partial] if partial else [], worker)
            try:
                new = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # between the rename and the new file: look again
                time.sleep(FOLLOW_INTERVAL)
                continue
            os.dup2(new, fd)
            os.close(new)
            inode, pos, partial, rotated = os.fstat(fd).st_ino, 0, b"", False
            continue
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino != inode:
            # Read the old file once more first: the writer may have added to it just before the rename.
            rotated = True
        elif current is not None and current.st_size < pos:  # truncated in place (copytruncate)
            pos, partial = 0, b""
        else:
            time.sleep(FOLLOW_INTERVAL)


def _print(raws: list[bytes], worker: int | None) -> None:
    out = [text for raw in raws if (text := _render(raw, worker)) is not None]
    if out:
        sys.stdout.write("".join(out))
        sys.stdout.flush()
