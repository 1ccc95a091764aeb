"""Flow `neo_pipeline`: download -> clean -> dedup -> tokenize -> train -> evaluate -> register.

Wiring only: each stage is a cached, versioned Prefect task in `tasks/`, gets its own config
section, and passes a small `StageResult` (fingerprint, path, counts) to the next.
"""
from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from tasks.clean.task import clean
from tasks.core import storage
from tasks.core.config import PipelineConfig, default_workspace, redacted_params
from tasks.core.protocol import StageResult
from tasks.dedup.task import dedup
from tasks.download.task import download
from tasks.evaluate.task import evaluate
from tasks.register.task import register
from tasks.tokenize.task import tokenize
from tasks.train.task import train


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


def _run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("config")
    name = cfg.get("name") if isinstance(cfg, dict) else getattr(cfg, "name", None)
    return f"neo-{name or 'pipeline'}"


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


def _stage(stage_task, *args) -> StageResult:
    """Run a stage task; a result served from Prefect's cache (state `Cached`) says `reused`, as a
    result rebuilt from a complete stage directory does (a cached result is the stored first one)."""
    state = stage_task(*args, return_state=True)
    result = state.result()  # raises the task's error when it failed
    return result.model_copy(update={"reused": True}) if state.name == "Cached" else result


@flow(name="neo_pipeline", flow_run_name=_run_name, log_prints=True)
def neo_pipeline(config: PipelineConfig = PipelineConfig(), workspace: str | None = None,
                 train_deployment: str | None = None) -> PipelineSummary | StageResult:
    """Pre-train and register a GPT-Neo model from a text corpus, end to end.

    With `train_deployment` (e.g. "neo_train_eval_register/train-eval-register"), training,
    evaluation and registration run as that deployment (on its work pool, e.g. GPU workers) once the
    data stages are done here; the workspace must then be storage both pools can reach (an fsspec
    URL such as s3://bucket/prefix; the token directory is handed over as its URL there).
    """
    _hold_while_file_exists()
    shared = workspace or str(default_workspace())
    ws = storage.attach(shared)  # a URL workspace: a local working copy, mirrored (tasks/core/storage.py)
    raw = _stage(download, config.corpus, ws)
    cleaned = _stage(clean, config.clean, raw, ws)
    deduped = _stage(dedup, config.dedup, cleaned, ws)
    tokens = _stage(tokenize, config.tokenizer, deduped, ws)
    if train_deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(train_deployment, parameters={
            "tokens_dir": storage.shared_path(tokens.path), "config": config.model_dump(mode="json"),
            "workspace": shared})
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"deployment {train_deployment} ended {run.state and run.state.name}: "
                               f"flow run {run.id}")
        return run.state.result()
    trained = _stage(train, config.train, config.model, tokens, ws)
    evaluated = _stage(evaluate, config.eval, trained, tokens, ws)
    registered = _stage(register, config.registry, evaluated, [raw, cleaned, deduped, tokens, trained],
                        redacted_params(config), ws)
    m = evaluated.info["metrics"]
    stages = {r.stage: r for r in (raw, cleaned, deduped, tokens, trained, evaluated, registered)}
    return PipelineSummary(workspace=shared, model_name=registered.info["model_name"],
                           version=registered.info["version"], alias=registered.info["alias"],
                           val_ppl=m["val_ppl"], val_bpb=m["val_bpb"], unigram_val_bpb=m["unigram_val_bpb"],
                           run_id=registered.info["run_id"], stages=stages)
