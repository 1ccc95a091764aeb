"""The `clean` Prefect task: cached by fingerprint, logs its counts and a report artifact."""
from __future__ import annotations

from prefect import get_run_logger

from tasks.clean.stage import STAGE, plan, report_lines, run_clean
from tasks.core.data_config import CleanConfig
from tasks.core.prefect_stage import report, stage_task
from tasks.core.protocol import StageResult


@stage_task(STAGE, plan)
def clean(cfg: CleanConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Repair Unicode, normalize, and reject documents by per-source quality rules, with a ledger."""
    result = run_clean(cfg, upstream, workspace)
    c = result.counts
    rejected = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:") and v}
    get_run_logger().info(f"clean: {c['docs_in']} docs in, {c['kept']} kept, rejected {rejected}, "
                          f"{result.info.get('repaired', 0)} repaired -> {result.path}")
    report(STAGE, result, report_lines(result))
    return result
