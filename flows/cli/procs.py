"""Long-running helper processes: free ports, detached starts with a log file, health waits, stops.

Used by `neo stack` (flows/cli/stack.py) and by tests that start real `prefect server` / `mlflow server`
processes. A started process leads its own session (process group), so stopping it also stops the
children it spawned (uvicorn/gunicorn workers), and it outlives the command that started it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# A running `neo stack` may hold the defaults; tests must never take them.
RESERVED_PORTS = frozenset({4200, 5000})
_EXIT_CODES: dict[int, int] = {}  # exit codes of children reaped by pid (is_alive / stop_process)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (never 4200 or 5000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def log_tail(log: str | Path | None, chars: int = 3000) -> str:
    """The last `chars` characters of a log file ('' if there is none)."""
    if log is None or not Path(log).exists():
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
        return f.read().decode("utf-8", "replace")


def wait_http(url: str, timeout: float, proc: subprocess.Popen | int | None = None,
              log: str | Path | None = None) -> bytes:
    """Poll GET `url` until it answers 200 and return the body.

    Fails early, with the log's tail, if `proc` (a Popen or pid) exits; raises TimeoutError after
    `timeout` seconds, also with the log's tail.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return r.read()
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        if proc is not None and not is_alive(proc):
            code = "" if exit_code(proc) is None else f" with code {exit_code(proc)}"
            raise RuntimeError(f"process {_pid(proc)} exited{code} before {url} answered; "
                               f"log {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s ({last}); "
                               f"log {log}:\n{log_tail(log)}")
        time.sleep(0.5)


def start_process(cmd: list[str], log_path: str | Path, env: dict[str, str] | None = None,
                  cwd: str | Path | None = None) -> subprocess.Popen:
    """Start `cmd` detached (own session and process group), stdout+stderr appended to `log_path`."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)


def _pid(proc: subprocess.Popen | int) -> int:
    return proc.pid if isinstance(proc, subprocess.Popen) else int(proc)


def _reap(pid: int) -> None:
    """Collect an exited child of ours so it does not linger as a zombie (no-op otherwise)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if done:
        _EXIT_CODES[pid] = os.waitstatus_to_exitcode(status)


def exit_code(proc: subprocess.Popen | int) -> int | None:
    """The exit code of a process of ours that has exited and been reaped, else None."""
    return proc.returncode if isinstance(proc, subprocess.Popen) else _EXIT_CODES.get(int(proc))


def is_alive(proc: subprocess.Popen | int) -> bool:
    """True while the process runs (a zombie counts as gone)."""
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is None
    pid = int(proc)
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pgid))  # killpg(…, 0) also succeeds on zombies: look for a live member


def group_members(pgid: int) -> set[int]:
    """Pids of the live (not zombie) processes in process group `pgid`, from /proc."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.add(int(stat.parent.name))
    return members


def stop_process(proc: subprocess.Popen | int, timeout: float = 15) -> bool:
    """Stop a process started by `start_process` and its whole group: SIGTERM, then SIGKILL.

    Returns False if nothing of it was running. Waits until the group is gone (or SIGKILLs it after
    `timeout` seconds).
    """
    pid = _pid(proc)
    was_alive = is_alive(proc)
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:  # leader gone; its group may live on (a group id is never reused)
        pgid = pid
    if pgid != pid:  # not a group leader: never signal a group we did not create
        pgid = None
    if not was_alive and (pgid is None or not _group_alive(pgid)):
        _reap(pid)
        return False
    # From here something of ours runs: the leader, or children of a leader that died.

    def send(sig: int) -> None:
        try:
            if pgid is not None:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def gone() -> bool:
        return not is_alive(proc) and (pgid is None or not _group_alive(pgid))

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() > deadline:
            send(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not gone() and time.monotonic() < deadline:
                time.sleep(0.1)
            break
        time.sleep(0.2)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    else:
        _reap(pid)
    return True
