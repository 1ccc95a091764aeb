"""The `train` Prefect task: retried once (a retry resumes from the newest checkpoint), with a
progress artifact fed by the training subprocess."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from tasks.core.train_config import ModelConfig, TrainConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult
from tasks.train.stage import STAGE, describe, plan, run_train


@stage_task(STAGE, plan, describe=describe, retries=1)
def train(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Pre-train GPT-Neo in a subprocess; a retry resumes from the newest checkpoint in the same
    MLflow run. Progress (percent, tokens/s, loss, ETA) is kept in a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    artifact: dict[str, Any] = {}

    def progress(p: dict[str, Any]) -> None:
        budgeted = p.get("max_steps") is None  # a time budget: progress is the share of it used
        pct = 100.0 * (min(1.0, p["fraction"]) if budgeted else p["step"] / p["max_steps"])
        eta = "?" if p.get("eta_s") is None else f"{p['eta_s']:.0f} s"
        where = f" ({pct:.0f}% of the time budget)" if budgeted else f"/{p['max_steps']}"
        desc = (f"step {p['step']}{where}, loss {p['loss']:.4f}, "
                f"{p['tokens_per_s']:,.0f} tokens/s, ETA {eta}")
        try:
            if "id" not in artifact:
                artifact["id"] = create_progress_artifact(progress=pct, key="train-progress",
                                                          description=desc)
            else:
                update_progress_artifact(artifact["id"], progress=pct, description=desc)
        except Exception as e:  # progress reporting must never fail the training
            logger.debug(f"progress artifact not updated: {e}")

    return run_train(cfg, model, upstream, workspace, log=logger.info, progress=progress)
