"""Flow `neo_pipeline`: download -> clean -> dedup -> tokenize -> train -> evaluate -> register.

Wiring only: the data flow (`flows/data.py`) and the train flow (`flows/train.py`) run as its
subflows, here or (with `train_deployment`) the train flow as a deployment on its own work pool.
Each stage is a cached, versioned Prefect task in `tasks/<stage>/task.py`, gets its own config
section, and passes a small `StageResult` (fingerprint, path, counts) to the next.
"""
from __future__ import annotations

from typing import Optional

from prefect import flow
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


@flow(name="neo_pipeline", flow_run_name=run_name("neo"), log_prints=True)
def neo_pipeline(config: PipelineConfig = PipelineConfig(), workspace: str | None = None,
                 train_deployment: str | None = None, preset: Optional[str] = None,
                 overrides: Overrides = None) -> PipelineSummary:
    """Pre-train and register a GPT-Neo model from a text corpus, end to end. `preset` (a name in
    configs/, e.g. "debug") with `overrides` ({"train.max_steps": 800}) replaces `config` when given.

    With `train_deployment` (e.g. "neo_train_eval_register/train-eval-register"), training,
    evaluation and registration run as that deployment (on its work pool, e.g. GPU workers) once the
    data stages are done here; the workspace must then be storage both pools can reach (an fsspec
    URL such as s3://bucket/prefix; the token directory is handed over as its URL there).
    """
    config = resolve_config(config, preset, overrides)  # a bad preset or key fails before any work
    _hold_while_file_exists()
    shared = workspace or str(default_workspace())
    data = neo_data(config, shared)
    tokens_dir = storage.shared_path(data["tokenize"].path)
    if train_deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(train_deployment, parameters={
            "tokens_dir": tokens_dir, "config": config.model_dump(mode="json"), "workspace": shared})
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"deployment {train_deployment} ended {run.state and run.state.name}: "
                               f"flow run {run.id}")
        trained = run.state.result()
    else:
        trained = neo_train_eval_register(tokens_dir, config, shared)
    stages = {**data, **trained}
    m, registered = stages["evaluate"].info["metrics"], stages["register"]
    return PipelineSummary(workspace=shared, model_name=registered.info["model_name"],
                           version=registered.info["version"], alias=registered.info["alias"],
                           val_ppl=m["val_ppl"], val_bpb=m["val_bpb"], unigram_val_bpb=m["unigram_val_bpb"],
                           run_id=registered.info["run_id"], stages=stages)
