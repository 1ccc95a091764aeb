"""The `dedup` Prefect task: cached by fingerprint, logs its counts and a report artifact."""
from __future__ import annotations

from prefect import get_run_logger

from tasks.core.data_config import DedupConfig
from tasks.core.prefect_stage import report, stage_task
from tasks.core.protocol import StageResult
from tasks.dedup.stage import STAGE, plan, report_lines, run_dedup


@stage_task(STAGE, plan)
def dedup(cfg: DedupConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Drop exact and near duplicate documents, keeping the earliest, with a duplicates ledger."""
    result = run_dedup(cfg, upstream, workspace)
    c = result.counts
    get_run_logger().info(f"dedup: {c['docs_in']} docs in, {c['kept']} kept, {c['duplicates']} "
                          f"duplicates in {result.info.get('clusters', 0)} clusters -> {result.path}")
    report(STAGE, result, report_lines(result))
    return result
