"""The `dedup` Prefect task: cached by fingerprint; logs its counts and writes a report artifact."""
from __future__ import annotations

from tasks.core.data_config import DedupConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult
from tasks.dedup.stage import STAGE, describe, plan, run_dedup


@stage_task(STAGE, plan, describe=describe)
def dedup(cfg: DedupConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Drop exact and near duplicate documents, keeping the earliest, with a duplicates ledger."""
    return run_dedup(cfg, upstream, workspace)
