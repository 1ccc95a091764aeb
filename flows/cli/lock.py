"""One `neo run` per workspace at a time: an exclusive flock on `<workspace>/.neo-run.lock`.

Two runs on one workspace would both train and register the same model; the second one instead says
who holds the workspace and stops (or, with `--wait`, waits for it). The kernel drops the lock when
its process ends, however it ends, so a killed run never leaves the workspace locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

LOCK = ".neo-run.lock"


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace; the message names it."""


def holder(ws: Path) -> str:
    """Who holds the workspace lock, as the holder recorded it."""
    try:
        info = json.loads((Path(ws) / LOCK).read_text())
        return f"pid {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def workspace_lock(ws: Path, wait: bool = False, echo: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the workspace for the block; raise WorkspaceBusy (or wait, with `wait`) if it is held."""
    ws = Path(ws)
    ws.mkdir(parents=True, exist_ok=True)
    with open(ws / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(ws)
            if not wait:
                raise WorkspaceBusy(f"workspace {ws} is in use by {who}; let it finish, or run again "
                                    "with --wait to start after it") from None
            echo(f"neo: waiting for {who} to finish with workspace {ws}")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": " ".join(["neo", *sys.argv[1:]]),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
