"""The CLI starts the embedded Prefect server (and a new workspace's MLflow store) in the background
while it imports the flows; the run then uses that one server instead of starting its own."""
import pytest
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.cli.runtime import prestart


@flow
def _one() -> int:
    return 1


def test_the_run_uses_the_prestarted_server_and_the_mlflow_store_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):  # a busy 2-core box
        prestart(tmp_path)()
    server = SubprocessASGIServer()
    try:
        assert server.running and server.server_process.poll() is None
        pid = server.server_process.pid
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
        assert _one() == 1
        assert SubprocessASGIServer().server_process.pid == pid  # no second server was started
    finally:
        server.stop()


def test_configured_servers_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    prestart(tmp_path)()
    assert not (tmp_path / "mlflow").exists()
    started = SubprocessASGIServer._instances.get(None)
    assert started is None or not started.running


def test_a_server_that_fails_to_start_fails_the_wait(tmp_path, monkeypatch):
    def broken(self, timeout=None):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(SubprocessASGIServer, "start", broken)
    with pytest.raises(RuntimeError, match="Timed out"):
        prestart(tmp_path)()


def test_a_new_workspace_starts_from_a_migrated_empty_prefect_database(tmp_path):
    """`neo data` in a fresh workspace: the first run keeps a copy of its database as Prefect migrated
    it, before any run was recorded; the next fresh workspace starts from that copy and holds only
    its own runs."""
    import os
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    import prefect

    neo = str(Path(sys.executable).parent / "neo")
    env = {**os.environ, "NEO_CACHE_DIR": str(tmp_path / "cache")}
    template = tmp_path / "cache" / "prefect-db" / f"prefect-{prefect.__version__}.db"

    def runs(db: Path) -> list[str]:
        with sqlite3.connect(db) as c:
            return [r[0] for r in c.execute("select name from flow_run")]

    for ws in ("ws1", "ws2"):
        done = subprocess.run([neo, "data", "-c", "debug", "-w", str(tmp_path / ws)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert template.is_file() and runs(template) == []
        assert runs(tmp_path / ws / "prefect" / "prefect.db") == ["data-debug"]
    with sqlite3.connect(template) as c:
        assert c.execute("select count(*) from block_type").fetchone()[0] > 0  # what the server registered
