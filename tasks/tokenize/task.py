"""The `tokenize` Prefect task: cached by fingerprint; logs its counts and writes a report artifact."""
from __future__ import annotations

from tasks.core.data_config import TokenizerConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult
from tasks.tokenize.stage import STAGE, describe, plan, run_tokenize


@stage_task(STAGE, plan, describe=describe)
def tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Tokenize the corpus into fixed-length token rows (tokenizer trained here or loaded)."""
    return run_tokenize(cfg, upstream, workspace)
