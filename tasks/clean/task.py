"""The `clean` Prefect task: cached by fingerprint; logs its counts and writes a report artifact."""
from __future__ import annotations

from prefect import get_run_logger

from tasks.clean.stage import STAGE, describe, plan, run_clean
from tasks.core.data_config import CleanConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult


@stage_task(STAGE, plan, describe=describe)
def clean(cfg: CleanConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Repair Unicode, normalize, and reject documents by per-source quality rules, with a ledger;
    a source that loses most of its lines is logged as a warning."""
    result = run_clean(cfg, upstream, workspace)
    for warning in result.info.get("warnings", []):
        get_run_logger().warning(warning)
    return result
