"""The `evaluate` Prefect task: logs the headline metrics and writes the report as an artifact."""
from __future__ import annotations

from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult
from tasks.core.train_config import EvalConfig
from tasks.evaluate.stage import STAGE, describe, plan, run_evaluate


@stage_task(STAGE, plan, describe=describe)
def evaluate(cfg: EvalConfig, upstream: StageResult, tokens: StageResult, workspace: str) -> StageResult:
    """Score the trained model on the validation split against a unigram baseline."""
    return run_evaluate(cfg, upstream, tokens, workspace)
