"""Tracking and registry against a real `mlflow server` process: SQLite and PostgreSQL backends.

The PostgreSQL case needs the server at 127.0.0.1:5432 (trust auth); it is skipped where that is
absent, except under CI=true where it must run. Each test creates and drops its own database.
"""
import os
import sys
import uuid

import pytest
from registry_helpers import evaluation, make_tokens, trained

from flows.cli.databases import drop_databases, ensure_databases
from tasks.register import registry
from tasks.core import tracking
from tasks.core.train_config import RegistryConfig
from flows.cli.procs import free_port, start_process, stop_process, wait_http
from tasks.register.stage import run_register


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path):
    db_url = None
    if request.param == "sqlite":
        backend = f"sqlite:///{tmp_path / 'server.db'}"
    else:
        db_url = f"{request.getfixturevalue('postgres_server')}/neo_mlflow_{uuid.uuid4().hex[:8]}"
        ensure_databases(db_url)
        backend = db_url
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "server.log"
    proc = start_process([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                          "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 180, proc, log)
        yield url
    finally:
        stop_process(proc, 30)
        if db_url:
            drop_databases(db_url)


def test_train_register_and_gate_against_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    tokens = make_tokens(tmp_path, ws)
    good, weak = trained(ws, tokens, 40), trained(ws, tokens, 3)
    cfg = RegistryConfig(model_name="neo-server")
    first = run_register(cfg, evaluation(ws, good, "good", 1.0, tokens), [tokens, good], {"train.lr": "0.003"}, str(ws))
    second = run_register(cfg, evaluation(ws, weak, "weak", 2.0, tokens), [tokens, weak], {"train.lr": "0.003"}, str(ws))
    assert (first.info["version"], first.info["alias"]) == ("1", "champion")
    assert (second.info["version"], second.info["alias"]) == ("2", "challenger")
    assert second.info["gate"]["candidate_bpb"] > second.info["gate"]["champion_bpb"]

    c = tracking.client(ws)
    assert c.tracking_uri == mlflow_server
    assert registry.alias_version(c, "neo-server", "champion") == "1"
    assert registry.alias_version(c, "neo-server", "challenger") == "2"
    history = c.get_metric_history(good.info["run_id"], "train_loss")
    assert [m.step for m in history] == list(range(5, 41, 5))
    assert c.get_run(good.info["run_id"]).data.params == {"train.lr": "0.003"}
    # Artifacts went through the server's proxied store, and the gate read the champion back from it.
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        a.path.rsplit("/", 1)[-1] for a in c.list_artifacts(good.info["run_id"], "hf_model")}
    assert not (ws / "mlflow").exists(), "with a server configured nothing is written to the embedded store"
