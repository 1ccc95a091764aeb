"""Flow `neo_train_eval_register`: train, evaluate and register from existing token shards.

The `train-eval-register` deployment runs this on the `gpu` work pool; `retrain` hands over to it
after the data stages ran on the `cpu` pool, and `neo_pipeline` runs it as a subflow (see
prefect.yaml and flows/pipeline.py). The registered version's lineage is the whole chain the token
directory's manifest records, whichever way the run came here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow

from flows.data import Overrides, run_name, run_task
from tasks.core import storage
from tasks.core.config import PipelineConfig, default_workspace, redacted_params, resolve_config
from tasks.core.protocol import StageResult, read_manifest, result_from_manifest
from tasks.evaluate.task import evaluate
from tasks.register.task import register
from tasks.tokenize.stage import STAGE as TOKENIZE
from tasks.train.task import train


def tokens_result(tokens_dir: str | Path) -> StageResult:
    """The StageResult of a complete tokens directory (fails clearly when it is not complete)."""
    manifest = read_manifest(Path(tokens_dir))
    if manifest is None or manifest.get("stage") != TOKENIZE.name:
        raise FileNotFoundError(f"{tokens_dir}: not a complete tokenize stage directory (manifest missing "
                                "or files changed); run the data-refresh deployment first")
    return result_from_manifest(Path(tokens_dir), manifest, reused=True, info_keys=TOKENIZE.info_keys)


# persist_result: `retrain` reads this run's result (the three stage results) after handing over to it.
@flow(name="neo_train_eval_register", flow_run_name=run_name("train"), log_prints=True, persist_result=True)
def neo_train_eval_register(tokens_dir: str, config: PipelineConfig = PipelineConfig(),
                            workspace: str | None = None, preset: Optional[str] = None,
                            overrides: Overrides = None) -> dict[str, StageResult]:
    """Train GPT-Neo on existing token shards, evaluate it and run the registry gate (`preset` with
    `overrides` replaces `config` when given)."""
    config = resolve_config(config, preset, overrides)  # a bad preset or key fails before any work
    ws = storage.attach(workspace or str(default_workspace()))
    tokens = tokens_result(storage.localize(tokens_dir))  # a URL: fetched from shared storage
    trained = run_task(train, config.train, config.model, tokens, ws)
    evaluated = run_task(evaluate, config.eval, trained, tokens, ws)
    registered = run_task(register, config.registry, evaluated, [tokens, trained], redacted_params(config), ws)
    return {"train": trained, "evaluate": evaluated, "register": registered}
