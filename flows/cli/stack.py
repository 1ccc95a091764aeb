"""`neo stack up|down|status`: a local Prefect server, workers for the `cpu` and `gpu` pools and an
MLflow server.

The servers listen on 127.0.0.1; all of them run detached (their own process groups), so they outlive the command;
pids and ports live in `<workspace>/stack/state.json`, logs in `<workspace>/stack/logs/`. By default the
servers use the workspace's embedded SQLite stores (`prefect/prefect.db`, `mlflow/mlflow.db`), so runs
recorded before the stack existed show up in its UIs. With `--db-url postgresql://USER[:PW]@HOST:PORT/BASE`
(or `$NEO_STACK_DB_URL`) Prefect uses database `BASE_prefect` and MLflow `BASE_mlflow`: both keep their
migration state in an `alembic_version` table, so they cannot share one. Missing databases are created.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import typer

from flows.cli.databases import DB_URL_ENV, StackError, database_urls, ensure_databases
from flows.cli.procs import is_alive, log_tail, port_in_use, start_process, stop_process, wait_http

POOLS = ("cpu", "gpu")
"""The work pools prefect.yaml's deployments use: data stages on `cpu`, training on `gpu`. On one
machine the stack serves both (the `gpu` worker's training runs on CPU when there is no GPU), so
`retrain`'s hand-off to train-eval-register is picked up without a second host."""
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
WORKERS = tuple(f"worker-{pool}" for pool in POOLS)
ORDER = ("prefect", "mlflow", *WORKERS)  # start order; stopped in reverse


def _quiet_env() -> dict[str, str]:
    from flows.cli.runtime import OFFLINE_DEFAULTS

    env = {**os.environ, **OFFLINE_DEFAULTS}
    bindir = os.path.dirname(sys.executable)  # the venv's `prefect`/`mlflow`/`torchrun` come first
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---- state -------------------------------------------------------------------------------------------

def _stack_dir(workspace: Path) -> Path:
    return workspace / "stack"


def load_state(workspace: Path) -> dict:
    path = _stack_dir(workspace) / "state.json"
    if not path.exists():
        return {"services": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise StackError(f"{path}: not valid JSON ({exc}); stop the processes by hand and delete it") from None


def _save_state(workspace: Path, state: dict) -> None:
    path = _stack_dir(workspace) / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


@contextlib.contextmanager
def _locked(workspace: Path):
    """One `neo stack` command at a time per workspace."""
    _stack_dir(workspace).mkdir(parents=True, exist_ok=True)
    with open(_stack_dir(workspace) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def running(svc: dict) -> bool:
    """The recorded pid still runs the recorded command (guards against a reused pid)."""
    if not is_alive(svc["pid"]):
        return False
    try:
        cmdline = Path(f"/proc/{svc['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return all(tok.encode() in cmdline for tok in svc["match"])


# ---- health ------------------------------------------------------------------------------------------

def _workers(prefect_api: str, pool: str) -> list[dict]:
    req = urllib.request.Request(f"{prefect_api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _wait_worker(svc: dict, prefect_api: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(w["name"] == svc["name"] and w.get("last_heartbeat_time")
                   for w in _workers(prefect_api, svc["pool"])):
                return
        except OSError:
            pass  # the pool is created by the worker on start: 404 until then
        if not is_alive(svc["pid"]):
            raise StackError(f"worker (pid {svc['pid']}) exited; log {svc['log']}:\n{log_tail(svc['log'])}")
        if time.monotonic() > deadline:
            raise StackError(f"worker {svc['name']} did not register with pool {svc['pool']!r} within "
                             f"{timeout:.0f} s; log {svc['log']}:\n{log_tail(svc['log'])}")
        time.sleep(1)


def healthy(key: str, svc: dict, state: dict) -> bool:
    """One quick probe: the server's health endpoint, or the worker's registration in its pool."""
    try:
        if key in WORKERS:
            return any(w["name"] == svc["name"] and w.get("status") == "ONLINE"
                       for w in _workers(state["services"]["prefect"]["api"], svc["pool"]))
        with urllib.request.urlopen(svc["health"], timeout=5) as r:
            return r.status == 200
    except (OSError, KeyError, ValueError):
        return False


# ---- up / down / status ------------------------------------------------------------------------------

def _service_specs(workspace: Path, prefect_port: int, mlflow_port: int, db: tuple[str, str, str]) -> dict:
    prefect_db, mlflow_db, _ = db
    logs = _stack_dir(workspace) / "logs"
    py = sys.executable
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    prefect_home = {"PREFECT_HOME": str(workspace / "prefect"),
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workspace / "prefect" / "storage")}
    return {
        "prefect": dict(
            name="prefect-server", port=prefect_port, api=api, ui=f"http://127.0.0.1:{prefect_port}",
            health=f"{api}/health", log=str(logs / "prefect-server.log"),
            match=["server", "start", "--port", str(prefect_port)],
            cmd=[py, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env={**prefect_home, "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db,
                 "PREFECT_UI_API_URL": api, "PREFECT_API_URL": ""}),
        "mlflow": dict(
            name="mlflow-server", port=mlflow_port, ui=mlflow_url, health=f"{mlflow_url}/health",
            log=str(logs / "mlflow-server.log"), match=["server", "--port", str(mlflow_port)],
            cmd=[py, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--artifacts-destination", str(workspace / "mlflow" / "artifacts"), "--workers", "1"],
            # The URI travels in the environment so a password never shows in `ps`.
            env={"MLFLOW_BACKEND_STORE_URI": mlflow_db, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        **{f"worker-{pool}": dict(
            name=f"neo-stack-{pool}", pool=pool, log=str(logs / f"worker-{pool}.log"),
            match=["worker", "start", f"neo-stack-{pool}"],
            cmd=[py, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                 "--name", f"neo-stack-{pool}", "--install-policy", "never"],
            # Flow runs the worker starts talk to the stack's servers and default to this workspace.
            env={**prefect_home, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url,
                 "NEO_HOME": str(workspace)}) for pool in POOLS},
    }


def up(workspace: Path, prefect_port: int | None = None, mlflow_port: int | None = None,
       db_url: str | None = None, timeout: float = 180, echo: Callable[[str], None] = print) -> dict:
    """Start whatever of the stack is not running and wait until all of it is healthy; returns the state.

    Ports: a running server keeps its own; otherwise the one given, else the one used last time in
    this workspace, else 4200 (Prefect) and 5000 (MLflow)."""
    workspace = Path(workspace).resolve()
    db = database_urls(workspace, db_url)
    with _locked(workspace):
        state = load_state(workspace)
        services = state["services"]
        for key in list(services):
            if not running(services[key]):
                del services[key]
        if {"prefect", "mlflow"} & set(services) and state.get("db") != db[2]:
            raise StackError(f"the stack runs on {state.get('db')}; `neo stack down` before switching to {db[2]}")
        ports = state.setdefault("ports", dict(DEFAULT_PORTS))
        for key, asked in (("prefect", prefect_port), ("mlflow", mlflow_port)):
            if key in services:
                if asked and asked != services[key]["port"]:
                    echo(f"{key} already runs on port {services[key]['port']} (not {asked})")
                ports[key] = services[key]["port"]
            elif asked:
                ports[key] = asked
        specs = _service_specs(workspace, ports["prefect"], ports["mlflow"], db)
        todo = [k for k in ORDER if k not in services]
        if not todo:
            echo(f"stack already running in {workspace} (nothing started)")
            return state
        for key in todo:
            if "port" in specs[key] and port_in_use(specs[key]["port"]):
                raise StackError(f"port {specs[key]['port']} on 127.0.0.1 is in use by a process this stack "
                                 f"did not start; choose another with --{key}-port")
        if db_url and {"prefect", "mlflow"} & set(todo):
            made = ensure_databases(db[0], db[1])
            if made:
                echo(f"created PostgreSQL databases: {', '.join(made)}")
        (workspace / "mlflow").mkdir(parents=True, exist_ok=True)
        (workspace / "prefect").mkdir(parents=True, exist_ok=True)
        state["db"] = db[2]
        started = []
        try:
            for key in ("prefect", "mlflow"):  # the two servers boot in parallel
                if key in todo:
                    _start(workspace, state, key, specs[key], echo)
                    started.append(key)
            for key in ("prefect", "mlflow"):
                svc = services[key]
                wait_http(svc["health"], timeout, svc["pid"], svc["log"])
            for key in (k for k in WORKERS if k in todo):
                _start(workspace, state, key, specs[key], echo)
                started.append(key)
            for key in (k for k in WORKERS if k in todo):
                _wait_worker(services[key], services["prefect"]["api"], timeout)
        except BaseException as exc:  # also Ctrl-C: leave nothing half-started behind
            for key in reversed(started):
                stop_process(services.pop(key)["pid"])
            _save_state(workspace, state)
            if isinstance(exc, (RuntimeError, TimeoutError)):
                raise StackError(str(exc)) from None
            raise
        _save_state(workspace, state)
    return state


def _start(workspace: Path, state: dict, key: str, spec: dict, echo: Callable[[str], None]) -> None:
    env = {**_quiet_env(), **spec["env"]}
    if not env.get("PREFECT_API_URL"):
        env.pop("PREFECT_API_URL", None)
    proc = start_process(spec["cmd"], spec["log"], env)
    svc = {k: v for k, v in spec.items() if k not in ("cmd", "env")}
    state["services"][key] = {**svc, "pid": proc.pid}
    _save_state(workspace, state)  # recorded at once, so `down` finds it even if `up` dies
    echo(f"started {spec['name']} (pid {proc.pid}), log {spec['log']}")


def down(workspace: Path, timeout: float = 15, echo: Callable[[str], None] = print) -> list[str]:
    """Stop every recorded service (process group: SIGTERM, then SIGKILL); returns the names stopped."""
    workspace = Path(workspace).resolve()
    stopped = []
    with _locked(workspace):
        state = load_state(workspace)
        for key in reversed(ORDER):
            svc = state["services"].pop(key, None)
            if svc and running(svc) and stop_process(svc["pid"], timeout):
                stopped.append(svc["name"])
                echo(f"stopped {svc['name']} (pid {svc['pid']})")
            _save_state(workspace, state)
    if not stopped:
        echo("stack not running")
    return stopped


def status(workspace: Path) -> dict[str, dict]:
    """Each service with `up` (process runs and answers its health probe), pid and address."""
    workspace = Path(workspace).resolve()
    state = load_state(workspace)
    out = {}
    for key in ORDER:
        svc = state["services"].get(key)
        alive = bool(svc) and running(svc)
        out[key] = {"up": alive and healthy(key, svc, state), "pid": svc["pid"] if alive else None,
                    "address": (svc.get("ui") or f"pool {svc['pool']}") if svc else None}
    return out


def exports(state: dict) -> list[str]:
    s = state["services"]
    return [f"export PREFECT_API_URL={s['prefect']['api']}", f"export MLFLOW_TRACKING_URI={s['mlflow']['ui']}"]


# ---- CLI ---------------------------------------------------------------------------------------------

stack_app = typer.Typer(no_args_is_help=True,
                        help="Local Prefect server, workers for the cpu and gpu pools, and MLflow server.")
_WS = typer.Option(None, "-w", "--workspace", help="Workspace root (default $NEO_HOME or ./.neo).")


def _ws(workspace: Optional[Path]) -> Path:
    from tasks.core.config import default_workspace

    return (workspace or default_workspace()).resolve()


@stack_app.command("up")
def up_cmd(workspace: Optional[Path] = _WS,
           prefect_port: Optional[int] = typer.Option(
               None, help="Prefect server (API and UI) port (default: last used, else 4200)."),
           mlflow_port: Optional[int] = typer.Option(None, help="MLflow server port (default: last used, else 5000)."),
           db_url: Optional[str] = typer.Option(None, envvar=DB_URL_ENV,
                                                help="postgresql://USER@HOST:PORT/BASE (default: SQLite)."),
           timeout: float = typer.Option(180, help="Seconds to wait for each service to become healthy.")) -> None:
    """Start the stack (idempotent) and print the UI addresses and the variables to export."""
    ws = _ws(workspace)
    try:
        state = up(ws, prefect_port, mlflow_port, db_url, timeout, echo=typer.echo)
    except StackError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    s = state["services"]
    typer.echo("\n".join([
        f"Prefect UI : {s['prefect']['ui']}", f"MLflow UI  : {s['mlflow']['ui']}",
        *(f"worker     : {s[k]['name']} polling pool {s[k]['pool']!r}" for k in WORKERS),
        f"database   : {state['db']}", f"logs       : {_stack_dir(ws) / 'logs'}",
        "Point neo and prefect at the stack:", *(f"  {line}" for line in exports(state))]))


@stack_app.command("down")
def down_cmd(workspace: Optional[Path] = _WS) -> None:
    """Stop the stack's services."""
    down(_ws(workspace), echo=typer.echo)


@stack_app.command("status")
def status_cmd(workspace: Optional[Path] = _WS) -> None:
    """Show each service up or down; exit code 1 unless all are up."""
    st = status(_ws(workspace))
    for key, s in st.items():
        pid = f"pid {s['pid']}" if s["pid"] else ""
        typer.echo(f"{key:<8} {'up' if s['up'] else 'down':<5} {pid:<11} {s['address'] or ''}")
    if not all(s["up"] for s in st.values()):
        raise typer.Exit(1)
