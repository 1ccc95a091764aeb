"""The `clean` Prefect task: cached by fingerprint; logs its counts and writes a report artifact."""
from __future__ import annotations

from tasks.clean.stage import STAGE, describe, plan, run_clean
from tasks.core.data_config import CleanConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult


@stage_task(STAGE, plan, describe=describe)
def clean(cfg: CleanConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Repair Unicode, normalize, and reject documents by per-source quality rules, with a ledger."""
    return run_clean(cfg, upstream, workspace)
