"""Integration: `retrain` deployed with prefect.yaml and run by real servers and process workers.

One stack per module, brought up by `neo stack up --db-url` alone: a `prefect server` and an `mlflow
server`, each on its own PostgreSQL database (dropped here at the end), process workers for the `cpu`
and `gpu` pools; then `neo notify setup` pointing at a webhook receiver in this process, and
`prefect deploy --all` from the repository root. Needs
PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth): skipped where absent, failed under CI=true.
Run it alone with `pytest -m integration`.
"""
import http.server
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from readme import fenced_commands, inline_code
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter,
                                            DeploymentFilterId, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentFlowRunId)
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import notify
from flows.cli.databases import database_urls, drop_databases
from tasks.core.config import load_config
from flows.cli.procs import free_port, log_tail, start_process, stop_process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA_STAGES, TRAIN_STAGES = ["download", "clean", "dedup", "tokenize"], ["train", "evaluate", "register"]
RUN_TIMEOUT_S = 600


# ---------------------------------------------------------------------------- webhook receiver


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # keep the test output clean
        pass


def _wait_for_message(received: list[dict], needle: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in list(received):
            if needle in msg.get("body", ""):
                return msg
        time.sleep(0.5)
    raise AssertionError(f"no webhook body names {needle!r} within {timeout:.0f} s; received: {received}")


# ---------------------------------------------------------------------------- the stack


def _finish(proc, log: Path, timeout: float = 300) -> None:
    """Wait for a command started with `start_process`; fail with its log unless it exited 0."""
    try:
        rc = proc.wait(timeout=timeout)
    except Exception:
        stop_process(proc)
        raise
    assert rc == 0, f"{' '.join(map(str, proc.args))} exited {rc}:\n{log_tail(log, 4000)}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres_server):
    """The stack as a user brings it up: `neo stack up --db-url ...` alone (Prefect and MLflow servers
    on their own PostgreSQL databases, workers for the `cpu` and `gpu` pools), then the README's
    `neo notify setup` and `prefect deploy --all` from the repository root; `neo stack down` at the end."""
    tmp = tmp_path_factory.mktemp("stack")
    stack_ws = tmp / "stack-ws"
    db_base = f"{postgres_server}/neo_it_{uuid.uuid4().hex[:8]}"
    prefect_db, mlflow_db, _ = database_urls(stack_ws, db_base)
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), type("H", (_Receiver,), {"received": []}))
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    p_port, m_port = free_port(), free_port()
    api, mlflow_url = f"http://127.0.0.1:{p_port}/api", f"http://127.0.0.1:{m_port}"
    base = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # the stack's processes inherit these: a run refused a concurrency slot is retried after 2 s
            # (default 30), workers poll every 2 s (default 10), flow-run logs go to the API
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_TO_API_ENABLED": "true"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        base.pop(key, None)
    # The README's "Local stack" block and "Scheduled retraining" commands, as written; the test adds
    # only its workspace, ports and database (flags the README documents) and swaps the printed ports.
    up_line, export_line, status_line, down_line = fenced_commands("### Local stack")
    assert (up_line, status_line, down_line) == ("neo stack up", "neo stack status", "neo stack down")
    here = ["-w", str(stack_ws)]
    try:
        up = start_process([*_argv(up_line), *here, "--prefect-port", str(p_port), "--mlflow-port", str(m_port),
                            "--db-url", db_base], tmp / "stack-up.log", env=base)
        _finish(up, tmp / "stack-up.log", timeout=600)
        exported = dict(item.split("=", 1) for item in shlex.split(export_line)[1:])
        exported = {k: v.replace(":4200", f":{p_port}").replace(":5000", f":{m_port}") for k, v in exported.items()}
        assert exported == {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url}, export_line
        client_env = {**base, **exported, "PREFECT_HOME": str(tmp / "client-prefect-home"),
                      "PREFECT_CLI_PROMPT": "false"}
        status = subprocess.run([*_argv(status_line), *here], capture_output=True, text=True, env=client_env,
                                timeout=120)
        assert status.returncode == 0 and "pool gpu" in status.stdout, status.stdout + status.stderr
        create = inline_code("prefect work-pool create cpu")
        for pool in ("cpu", "gpu"):  # "the same for `gpu`": works after `neo stack up` made both pools
            made = subprocess.run(_argv(create.replace(" cpu ", f" {pool} ")), capture_output=True, text=True,
                                  env=client_env, timeout=120)
            assert made.returncode == 0, made.stdout + made.stderr
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            webhook = f"http://127.0.0.1:{receiver.server_port}/hook"
            # `neo notify setup` and `prefect deploy` (from the repository root) run side by side.
            setup = start_process([str(BIN / "neo"), "notify", "setup", "--webhook", webhook],
                                  tmp / "notify.log", env=client_env, cwd=ROOT)
            deploy = start_process(_argv(inline_code("prefect deploy --all")), tmp / "deploy.log", env=client_env,
                                   cwd=ROOT)
            _finish(setup, tmp / "notify.log")
            _finish(deploy, tmp / "deploy.log")
            yield {"client": client, "api": api, "mlflow": mlflow_url, "tmp": tmp, "webhook": webhook,
                   "env": client_env, "logs": stack_ws / "stack" / "logs",
                   "received": receiver.RequestHandlerClass.received}
    finally:
        down = subprocess.run([*_argv(down_line), *here], capture_output=True, text=True, env=base, timeout=120)
        receiver.shutdown()
        drop_databases(prefect_db, mlflow_db)
        assert down.returncode == 0, down.stdout + down.stderr


def _argv(line: str) -> list[str]:
    """A README command line as argv, its program (`neo`, `prefect`) taken from this venv."""
    argv = shlex.split(line)
    return [str(BIN / argv[0]), *argv[1:]]


def _logs(stack) -> str:
    return "\n".join(f"--- {name}:\n{log_tail(stack['logs'] / name, 2500)}"
                     for name in ("worker-cpu.log", "worker-gpu.log", "prefect-server.log"))


def _wait_run(stack, run_id, until, what: str, timeout: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        run = stack["client"].read_flow_run(run_id)
        if run.state is not None and until(run.state):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {run_id} ({what}) still {run.state and run.state.name} after "
                                 f"{timeout:.0f} s\n{_logs(stack)}")
        time.sleep(1)


def _deployment(stack, name: str):
    return stack["client"].read_deployment_by_name(name)


def _trigger(stack, preset: str, workspace: Path, hold: Path | None = None, overrides: dict | None = None):
    """A retrain run with parameters as a user gives them: a preset name and overrides."""
    dep = _deployment(stack, "neo_pipeline/retrain")
    job_variables = {"env": {"NEO_HOLD_FILE": str(hold)}} if hold else None
    params = {"preset": preset, "workspace": str(workspace), **({"overrides": overrides} if overrides else {})}
    return stack["client"].create_flow_run_from_deployment(
        dep.id, parameters=params,
        job_variables=job_variables).id


def _flow_tree(stack, flow_run_id) -> list:
    """The flow run and its subflow runs, transitively (the pipeline runs the data flow as one)."""
    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = stack["client"].read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        frontier = [c.id for c in children]
        ids += frontier
    return ids


def _task_states(stack, flow_run_id, stages: list[str]) -> dict[str, str]:
    """Stage -> state name of its task run in the flow run or its subflows (task runs are recorded
    asynchronously: wait for all)."""
    deadline = time.monotonic() + 60
    while True:
        tree = _flow_tree(stack, flow_run_id)
        runs = stack["client"].read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=tree)))
        states = {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state and r.state.is_final()}
        states = {k: v for k, v in states.items() if k in stages}
        if len(states) == len(stages) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def _artifact_keys(stack, flow_run_id) -> set[str]:
    arts = stack["client"].read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=_flow_tree(stack, flow_run_id))))
    return {a.key for a in arts if a.key}


@pytest.fixture(scope="module")
def retrain(stack):
    """One `retrain` run of the debug preset, handed to `train-eval-register` on the gpu pool."""
    ws = stack["tmp"] / "workspace"
    cfg = load_config("debug")
    run_id = _trigger(stack, "debug", ws)
    run = _wait_run(stack, run_id, lambda s: s.is_final(), "retrain")
    assert run.state.is_completed(), f"retrain ended {run.state.name}: {run.state.message}\n{_logs(stack)}"
    ter = _deployment(stack, "neo_train_eval_register/train-eval-register")
    children = stack["client"].read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[ter.id])))
    assert len(children) == 1, [c.name for c in children]
    return {"run": run, "child": children[0], "cfg": cfg, "ws": ws}


def test_retrain_completes_every_stage_on_both_pools(stack, retrain):
    run, child = retrain["run"], retrain["child"]
    assert run.work_pool_name == "cpu" and child.work_pool_name == "gpu"
    assert child.state.is_completed(), child.state
    assert _task_states(stack, run.id, DATA_STAGES) == {s: "Completed" for s in DATA_STAGES}
    assert _task_states(stack, child.id, TRAIN_STAGES) == {s: "Completed" for s in TRAIN_STAGES}
    # The hand-off is recorded as a task run of the retrain flow run that parents the child run.
    parent_tasks = stack["client"].read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert child.parent_task_run_id in {t.id for t in parent_tasks}
    assert _artifact_keys(stack, run.id) >= {f"{s}-report" for s in DATA_STAGES}
    assert _artifact_keys(stack, child.id) >= {f"{s}-report" for s in TRAIN_STAGES} | {"registered-model"}
    # The child's result was persisted for the hand-off to read; its untyped ("unknown") artifact, a
    # pickle path in the worker's Prefect home, is gone once read.
    arts = stack["client"].read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=_flow_tree(stack, run.id) + [child.id])))
    assert [(a.flow_run_id, a.task_run_id, a.data) for a in arts if a.type is None] == []


def test_mlflow_registered_the_champion_from_that_run(stack, retrain):
    c = MlflowClient(tracking_uri=stack["mlflow"])
    name = retrain["cfg"].registry.model_name
    mv = c.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == "1" and set(mv.aliases) == {"champion"}
    assert [str(v.version) for v in c.search_model_versions(f"name = '{name}'")] == ["1"]
    mlflow_run = c.get_run(mv.run_id)
    assert mlflow_run.data.tags["prefect.flow_run_id"] == str(retrain["child"].id)
    assert mlflow_run.data.params["train.max_steps"] == str(retrain["cfg"].train.max_steps)
    assert {"config.json", "model.safetensors"} <= {a.path.rsplit("/", 1)[-1]
                                                   for a in c.list_artifacts(mv.run_id, "hf_model")}
    # lineage through the hand-off: the data stages (run on the cpu pool) are on the version too
    lineage = {k.removeprefix("neo.fp."): v for k, v in mv.tags.items() if k.startswith("neo.fp.")}
    assert set(lineage) == set(DATA_STAGES) | {"train", "evaluate"}
    assert all((retrain["ws"] / stage / fp / "manifest.json").is_file() for stage, fp in lineage.items())


def test_deployment_schedule_and_concurrency_as_stored(stack):
    dep = _deployment(stack, "neo_pipeline/retrain")
    assert dep.work_pool_name == "cpu"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [("0 3 * * 1", "UTC", True)]
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert dep.parameters["train_deployment"] == "neo_train_eval_register/train-eval-register"
    ter = _deployment(stack, "neo_train_eval_register/train-eval-register")
    assert ter.work_pool_name == "gpu" and ter.global_concurrency_limit.limit == 1
    assert _deployment(stack, "neo_data/data-refresh").work_pool_name == "cpu"


def test_ui_pages_are_served(stack):
    import re
    import urllib.request

    for url, title in ((stack["api"].removesuffix("/api") + "/", "Prefect"), (stack["mlflow"] + "/", "MLflow")):
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
            page = r.read().decode("utf-8", "replace")
        found = re.search(r"<title>(.*?)</title>", page, re.S)
        assert found and title in found.group(1), (url, found and found.group(1))


def test_promotion_is_notified(stack, retrain):
    name = retrain["cfg"].registry.model_name
    msg = _wait_for_message(stack["received"], f"Model {name} version 1 is now @champion")
    assert msg["source"] == "neo-pipeline" and "Reason: first model" in msg["body"]
    assert str(retrain["child"].id) in msg["body"]  # the event carries the run that promoted


def test_second_retrain_waits_for_the_slot_and_failures_are_notified(stack, retrain):
    """Run A is held (by NEO_HOLD_FILE) inside its slot; run B must wait; both then fail (no corpus)."""
    bad = {"corpus.sources": ["/nonexistent/neo-it-corpus"]}
    hold = stack["tmp"] / "hold"
    hold.touch()
    ws = stack["tmp"] / "workspace-failing"
    a = _trigger(stack, "debug", ws, hold=hold, overrides=bad)
    _wait_run(stack, a, lambda s: s.is_running(), "held run", timeout=300)
    b = _trigger(stack, "debug", ws, overrides=bad)
    waiting = _wait_run(stack, b, lambda s: s.name == "AwaitingConcurrencySlot", "second run", timeout=120)
    assert waiting.state.is_scheduled()
    assert stack["client"].read_flow_run(a).state.is_running()  # still holding the slot
    hold.unlink()
    run_a = _wait_run(stack, a, lambda s: s.is_final(), "released run")
    run_b = _wait_run(stack, b, lambda s: s.is_final(), "second run")
    assert run_a.state.is_failed() and "does not exist" in (run_a.state.message or "")
    assert run_b.state.is_failed()
    history = [s.name for s in stack["client"].read_flow_run_states(b)]
    assert "AwaitingConcurrencySlot" in history and history[-1] == "Failed", history
    assert run_b.start_time >= run_a.end_time  # it ran only once A had given the slot back
    for run in (run_a, run_b):
        msg = _wait_for_message(stack["received"], str(run.id))
        assert f"Flow run {run.name} (id {run.id}) of deployment neo_pipeline/retrain entered Failed" in msg["body"]
    assert not any(str(retrain["run"].id) in m["body"] for m in stack["received"])  # success is not reported


def test_notify_setup_is_idempotent(stack):
    before = {name: stack["client"].read_automations_by_name(name) for name in
              (notify.FAILED_AUTOMATION, notify.PROMOTED_AUTOMATION)}
    with temporary_settings({PREFECT_API_URL: stack["api"]}):
        again = notify.setup(stack["webhook"])
    for name, found in before.items():
        after = stack["client"].read_automations_by_name(name)
        assert [a.id for a in after] == [a.id for a in found] == [again.automations[name]]
        assert after[0].enabled and after[0].actions[0].block_document_id == again.block_id


def test_readme_deployment_run_command_as_written(stack, retrain):
    """The README's `prefect deployment run 'neo_pipeline/retrain' --param preset=... --param
    'overrides=...'`, run as written, creates a retrain run with exactly those parameters (cancelled
    here: the full run is what the `retrain` fixture already did)."""
    from prefect.states import Cancelled

    dep = _deployment(stack, "neo_pipeline/retrain")
    before = {r.id for r in stack["client"].read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))}
    line = inline_code("prefect deployment run")
    out = subprocess.run(_argv(line), capture_output=True, text=True, env=stack["env"], cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = stack["client"].read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    [new] = [r for r in runs if r.id not in before]
    try:
        given = dict(p.split("=", 1) for p in shlex.split(line)[5::2])
        assert new.parameters["preset"] == given["preset"] == "debug"
        assert new.parameters["overrides"] == json.loads(given["overrides"]) == {"train.max_steps": 800}
    finally:
        stack["client"].set_flow_run_state(new.id, Cancelled(message="README walk: parameters checked"), force=True)
