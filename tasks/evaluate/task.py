"""The `evaluate` Prefect task: logs the headline metrics and the report as an artifact."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from tasks.core.train_config import EvalConfig
from tasks.core.prefect_stage import report, stage_task
from tasks.core.protocol import StageResult
from tasks.evaluate.stage import STAGE, plan, run_evaluate


@stage_task(STAGE, plan)
def evaluate(cfg: EvalConfig, upstream: StageResult, tokens: StageResult, workspace: str) -> StageResult:
    """Score the trained model on the validation split against a unigram baseline."""
    result = run_evaluate(cfg, upstream, tokens, workspace)
    m = result.info["metrics"]
    get_run_logger().info(f"val loss {m['val_loss']:.4f}, ppl {m['val_ppl']:.2f}, bpb {m['val_bpb']:.4f} "
                          f"(unigram baseline bpb {m['unigram_val_bpb']:.4f})")
    report(STAGE, result, [Path(result.info["report_path"]).read_text()])
    return result
