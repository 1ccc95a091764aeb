"""Flow `neo_pipeline`: download -> clean -> dedup -> tokenize -> train -> evaluate -> register.

Wiring only: the data flow (`flows/data.py`) and the train flow (`flows/train.py`) run as its
subflows, here or (with `train_deployment`) the train flow as a deployment on its own work pool.
Each stage is a cached, versioned Prefect task in `tasks/<stage>/task.py`, gets its own config
section, and passes a small `StageResult` (fingerprint, path, counts) to the next.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.data import Overrides, neo_data, run_name
from flows.train import neo_train_eval_register
from tasks.core import storage
from tasks.core.config import PipelineConfig, default_workspace, resolve_config
from tasks.core.protocol import StageResult


class PipelineSummary(BaseModel):
    workspace: str
    model_name: str
    version: str
    alias: str
    val_ppl: float
    val_bpb: float
    unigram_val_bpb: float
    run_id: str
    stages: dict[str, StageResult]


HOLD_FILE_ENV = "NEO_HOLD_FILE"
"""Operations hook: while the file this variable names exists, a run waits before its first stage."""


def _hold_while_file_exists() -> None:
    """Keep a started run in its concurrency slot until the hold file is removed.

    Lets a test (or an operator draining a host) hold `retrain` deterministically, without timing:
    pass `NEO_HOLD_FILE` in the run's job variables (`env`), delete the file to release it. Unset,
    as in every scheduled run, this returns at once.
    """
    import os
    import time

    path = os.environ.get(HOLD_FILE_ENV)
    if path and os.path.exists(path):
        print(f"held: waiting until {path} is removed ({HOLD_FILE_ENV})")
        while os.path.exists(path):
            time.sleep(0.2)


@task(name="hand-off", cache_policy=NO_CACHE)
def hand_off(train_deployment: str, tokens_dir: str, config: PipelineConfig, workspace: str,
             start_timeout: float, poll_s: float = 1.0) -> dict[str, StageResult]:
    """Run the train flow as `train_deployment` on its own work pool and return its stage results."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    run = run_deployment(train_deployment, parameters={
        "tokens_dir": tokens_dir, "config": config.model_dump(mode="json"), "workspace": workspace},
        flow_run_name=f"train-{config.name}", timeout=0)
    deadline = time.monotonic() + start_timeout
    with get_client(sync_client=True) as client:
        while not (fr := client.read_flow_run(run.id)).state.is_final():
            waiting = fr.state.is_scheduled() or fr.state.is_pending()
            if waiting and time.monotonic() > deadline:
                pool = fr.work_pool_name or client.read_deployment(fr.deployment_id).work_pool_name
                if not _live_workers(client, pool):
                    client.set_flow_run_state(run.id, Cancelled(message="no worker serves its pool"), force=True)
                    raise RuntimeError(
                        f"no worker picked up flow run {fr.name!r} of deployment {train_deployment} within "
                        f"{start_timeout:.0f} s: work pool {pool!r} has no live worker. Start one with "
                        f"`prefect worker start --pool {pool}` (or `neo stack up`, which serves the cpu and "
                        "gpu pools on this machine)")
            time.sleep(poll_s)
        if not fr.state.is_completed():
            raise RuntimeError(f"deployment {train_deployment} ended {fr.state.name}: flow run {fr.name} ({fr.id})")
        result = fr.state.result()
        drop_result_artifacts(client, fr)
    return result


def drop_result_artifacts(client: Any, child: Any, wait_s: float = 15.0) -> int:
    """Delete the untyped artifacts Prefect's server makes of a persisted result: they show as
    "unknown" in the UI and hold only the pickle's path under the Prefect home. The child run's
    result is persisted only so that this hand-off can read it, which it has done; the server records
    it twice, for the child flow run and for the task run standing for it here (whose final state
    the child's engine sets just after its own: waited for). Returns how many were deleted."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterTaskRunId

    stub = child.parent_task_run_id
    deadline = time.monotonic() + wait_s
    while stub is not None and time.monotonic() < deadline:
        state = client.read_task_run(stub).state
        if state is not None and state.is_final():
            break
        time.sleep(0.2)
    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child.id])))
    if stub is not None:
        found += client.read_artifacts(artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=[stub])))
    untyped = {a.id for a in found if a.type is None and a.key is None}
    for artifact_id in untyped:
        client.delete_artifact(artifact_id)
    return len(untyped)


def _live_workers(client: Any, pool: str) -> list[str]:
    """Names of the pool's workers that are online (a worker with a recent heartbeat)."""
    try:
        return [w.name for w in client.read_workers_for_work_pool(pool) if str(w.status).endswith("ONLINE")]
    except Exception:  # a pool that does not exist (yet) has no workers
        return []


@flow(name="neo_pipeline", flow_run_name=run_name("neo"), log_prints=True)
def neo_pipeline(config: PipelineConfig = PipelineConfig(), workspace: str | None = None,
                 train_deployment: str | None = None, preset: Optional[str] = None,
                 overrides: Overrides = None, handoff_start_timeout: float = 600) -> PipelineSummary:
    """Pre-train and register a GPT-Neo model from a text corpus, end to end. `preset` (a name in
    configs/, e.g. "debug") with `overrides` ({"train.max_steps": 800}) replaces `config` when given.

    With `train_deployment` (e.g. "neo_train_eval_register/train-eval-register"), training,
    evaluation and registration run as that deployment (on its work pool, e.g. GPU workers) once the
    data stages are done here; the workspace must then be storage both pools can reach (an fsspec
    URL such as s3://bucket/prefix; the token directory is handed over as its URL there). When no
    live worker serves that deployment's pool for `handoff_start_timeout` seconds, the run fails,
    naming the pool (and the waiting child run is cancelled), instead of waiting forever.
    """
    config = resolve_config(config, preset, overrides)  # a bad preset or key fails before any work
    _hold_while_file_exists()
    shared = workspace or str(default_workspace())
    data = neo_data(config, shared)
    tokens_dir = storage.shared_path(data["tokenize"].path)
    if train_deployment:
        trained = hand_off.with_options(task_run_name=f"hand-off-{config.name}-{data['tokenize'].fingerprint[:10]}")(
            train_deployment, tokens_dir, config, shared, handoff_start_timeout)
    else:
        # in-process: the subflow's result needs no persisting (no untyped result artifacts either)
        trained = neo_train_eval_register.with_options(persist_result=False)(tokens_dir, config, shared)
    stages = {**data, **trained}
    m, registered = stages["evaluate"].info["metrics"], stages["register"]
    return PipelineSummary(workspace=shared, model_name=registered.info["model_name"],
                           version=registered.info["version"], alias=registered.info["alias"],
                           val_ppl=m["val_ppl"], val_bpb=m["val_bpb"], unigram_val_bpb=m["unigram_val_bpb"],
                           run_id=registered.info["run_id"], stages=stages)
