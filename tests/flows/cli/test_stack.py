"""`neo stack up|status|down`: real Prefect server, cpu- and gpu-pool workers and MLflow server on free ports.

SQLite in a temporary workspace, and PostgreSQL when the server at 127.0.0.1:5432 (trust auth) is
there (skipped otherwise, except under CI=true where it must run); the PostgreSQL case creates its
own databases through `neo stack up` and drops them afterwards.
"""
import contextlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from flows.cli.databases import database_urls, drop_databases
from flows.cli.stack import load_state
from flows.cli.procs import free_port, group_members, is_alive, start_process, stop_process, wait_http

runner = CliRunner()


def _neo(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read()


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _rows(db_url: str | None, ws: Path, which: str, sql: str) -> list[tuple]:
    """Rows of `sql` in the stack's Prefect or MLflow database (SQLite file or PostgreSQL)."""
    if db_url is None:
        import sqlite3

        with contextlib.closing(sqlite3.connect(ws / which / f"{which}.db")) as conn:
            return conn.execute(sql).fetchall()
    import psycopg

    with psycopg.connect(f"{db_url}_{which}") as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    if request.param == "sqlite":
        yield None
        return
    url = f"{request.getfixturevalue('postgres_server')}/neo_stack_{uuid.uuid4().hex[:8]}"
    yield url
    prefect_db, mlflow_db, _ = database_urls(Path("/unused"), url)
    drop_databases(prefect_db, mlflow_db)


@pytest.mark.integration
def test_stack_up_status_idempotent_down(tmp_path, db_url):
    ws = tmp_path / "ws"
    pport, mport = free_port(), free_port()
    env = {} if db_url is None else {"NEO_STACK_DB_URL": db_url}
    try:
        r = runner.invoke(app, ["stack", "up", "-w", str(ws), "--prefect-port", str(pport),
                                "--mlflow-port", str(mport), "--timeout", "300"], env=env)
        assert r.exit_code == 0, r.output
        api = f"http://127.0.0.1:{pport}/api"
        assert f"export PREFECT_API_URL={api}" in r.output
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mport}" in r.output
        assert f"Prefect UI : http://127.0.0.1:{pport}" in r.output
        pids = {k: v["pid"] for k, v in load_state(ws)["services"].items()}
        assert set(pids) == {"prefect", "mlflow", "worker-cpu", "worker-gpu"} and all(map(is_alive, pids.values()))
        members = {p for pid in pids.values() for p in group_members(pid)}
        assert len(members) >= 4

        st = _neo("stack", "status", "-w", ws)
        assert st.exit_code == 0, st.output
        assert [line.split()[:2] for line in st.output.splitlines()] == [
            ["prefect", "up"], ["mlflow", "up"], ["worker-cpu", "up"], ["worker-gpu", "up"]]
        assert "pool gpu" in st.output  # which pools have a live worker
        assert json.loads(_get(f"{api}/health")) is True
        assert _get(f"http://127.0.0.1:{mport}/health") == b"OK"
        for name in ("cpu", "gpu"):  # both pools prefect.yaml uses are served on this machine
            assert json.loads(_get(f"{api}/work_pools/{name}"))["type"] == "process"
            workers = _post(f"{api}/work_pools/{name}/workers/filter", {})
            assert [(w["name"], w["status"]) for w in workers] == [(f"neo-stack-{name}", "ONLINE")]
        # The README's deployment sequence works after `neo stack up` created the pools (--overwrite).
        for name in ("cpu", "gpu"):
            made = subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", name,
                                   "--type", "process", "--overwrite"], capture_output=True, text=True,
                                  env={**os.environ, "PREFECT_API_URL": api}, timeout=120)
            assert made.returncode == 0, made.stdout + made.stderr
        # Each server migrated its own database, and Prefect's holds the pools.
        assert sorted(_rows(db_url, ws, "prefect", "SELECT name, type FROM work_pool")) == [
            ("cpu", "process"), ("gpu", "process")]
        assert len(_rows(db_url, ws, "mlflow", "SELECT version_num FROM alembic_version")) == 1
        assert len(_rows(db_url, ws, "prefect", "SELECT version_num FROM alembic_version")) == 1
        if db_url is not None:
            assert not (ws / "prefect" / "prefect.db").exists() and not (ws / "mlflow" / "mlflow.db").exists()

        again = runner.invoke(app, ["stack", "up", "-w", str(ws), "--prefect-port", str(pport),
                                    "--mlflow-port", str(mport)], env=env)
        assert again.exit_code == 0, again.output
        assert "nothing started" in again.output
        assert {k: v["pid"] for k, v in load_state(ws)["services"].items()} == pids
        if db_url is None:  # a dead service is restarted alone, on the ports used before
            stop_process(pids["worker-cpu"])
            third = _neo("stack", "up", "-w", ws)
            assert third.exit_code == 0, third.output
            assert [ln.split()[1] for ln in third.output.splitlines() if ln.startswith("started")] == [
                "neo-stack-cpu"]
            new = {k: v["pid"] for k, v in load_state(ws)["services"].items()}
            assert new["worker-cpu"] != pids["worker-cpu"] and {**new, "worker-cpu": 0} == {**pids, "worker-cpu": 0}
            assert f"Prefect UI : http://127.0.0.1:{pport}" in third.output
            pids = new
            members = {p for pid in pids.values() for p in group_members(pid)}
        logs = sorted(p.name for p in (ws / "stack" / "logs").iterdir())
        assert logs == ["mlflow-server.log", "prefect-server.log", "worker-cpu.log", "worker-gpu.log"]
    finally:
        down = _neo("stack", "down", "-w", ws)
    assert down.exit_code == 0, down.output
    assert down.output.count("stopped ") == 4
    assert not any(map(is_alive, pids.values()))
    assert not any(map(is_alive, members)), "child processes (uvicorn) outlived their server"
    assert load_state(ws)["services"] == {}
    st = _neo("stack", "status", "-w", ws)
    assert st.exit_code == 1
    assert [line.split()[:2] for line in st.output.splitlines()] == [
        ["prefect", "down"], ["mlflow", "down"], ["worker-cpu", "down"], ["worker-gpu", "down"]]


def test_bad_settings_fail_clearly(tmp_path):
    r = _neo("stack", "up", "-w", tmp_path, "--db-url", "mysql://u@h/x")
    assert r.exit_code == 1 and "expected postgresql://" in r.output
    busy = free_port()
    import socket

    with socket.socket() as s:  # a port held by someone else is refused before anything starts
        s.bind(("127.0.0.1", busy))
        s.listen()
        r = _neo("stack", "up", "-w", tmp_path, "--prefect-port", busy, "--mlflow-port", free_port())
    assert r.exit_code == 1 and f"port {busy}" in r.output and "--prefect-port" in r.output
    assert load_state(tmp_path)["services"] == {}



def test_a_service_that_dies_fails_up_with_its_log_and_nothing_is_left_running(tmp_path, monkeypatch):
    """Stand-ins for the servers (no Prefect start-up): `prefect` is a static file server whose
    /api/health exists, `mlflow` prints a message and exits; `up` reports that log and stops the other."""
    import flows.cli.stack as stack

    site = tmp_path / "site"
    (site / "api").mkdir(parents=True)
    (site / "api" / "health").write_text("true")
    real = stack._service_specs

    def specs(workspace, pport, mport, db):
        s = real(workspace, pport, mport, db)
        s["prefect"].update(cmd=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                 str(site), str(pport)], match=["http.server"])
        s["mlflow"].update(cmd=[sys.executable, "-c", "print('mlflow says boom'); raise SystemExit(3)"],
                           match=[])
        return s

    def stand_in_pids() -> list[int]:
        return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                if str(site).encode() in p.read_bytes() and is_alive(int(p.parent.name))]

    monkeypatch.setattr(stack, "_service_specs", specs)
    lines = []
    with pytest.raises(stack.StackError, match="(?s)exited with code 3.*mlflow says boom"):
        stack.up(tmp_path, free_port(), free_port(), timeout=60, echo=lines.append)
    assert [ln.split()[1] for ln in lines] == ["prefect-server", "mlflow-server"]  # both had started
    assert load_state(tmp_path)["services"] == {}
    assert stand_in_pids() == []


def test_process_helpers_stop_the_whole_group_and_report_early_exits(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    # The leader starts a child (a sleeper) and serves HTTP: stopping must end both.
    proc = start_process(["bash", "-c", f"sleep 300 & exec {sys.executable} -m http.server --bind 127.0.0.1 "
                                        f"--directory {tmp_path} {port}"], log)
    assert b"server.log" in wait_http(f"http://127.0.0.1:{port}/", 60, proc, log)
    group = group_members(proc.pid)
    assert len(group) == 2
    assert stop_process(proc.pid, 10) is True
    assert not any(map(is_alive, group))
    assert stop_process(proc.pid, 10) is False

    dead = start_process(["bash", "-c", "echo 'no config found'; exit 4"], log)
    with pytest.raises(RuntimeError, match="(?s)exited with code 4.*no config found"):
        wait_http(f"http://127.0.0.1:{free_port()}/", 60, dead, log)
    sleeper = start_process(["sleep", "300"], log)
    with pytest.raises(TimeoutError, match="did not answer 200"):
        wait_http(f"http://127.0.0.1:{free_port()}/", 1, sleeper, log)
    assert stop_process(sleeper, 10) is True and sleeper.returncode is not None
