"""The `tokenize` Prefect task: cached by fingerprint, logs its counts and a report artifact."""
from __future__ import annotations

from prefect import get_run_logger

from tasks.core.data_config import TokenizerConfig
from tasks.core.prefect_stage import report, stage_task
from tasks.core.protocol import StageResult
from tasks.tokenize.stage import STAGE, plan, run_tokenize


@stage_task(STAGE, plan)
def tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Tokenize the corpus into fixed-length token rows (tokenizer trained here or loaded)."""
    result = run_tokenize(cfg, upstream, workspace)
    c, info = result.counts, result.info
    get_run_logger().info(
        f"tokenize: {c['train_rows']:,} train / {c['val_rows']:,} val rows of {info['seq_len']} "
        f"from {c['docs_in']:,} documents, vocab {info['vocab_size']:,} (reused: {result.reused})")
    per_source = [f"- {s} {src}: {a['docs']:,} docs drawn, {a['bytes']:,} bytes, {a['tokens']:,} tokens"
                  for s, by in info.get("sources", {}).items() for src, a in by.items()]
    report(STAGE, result, [
        f"- tokenizer: {info.get('tokenizer_name', '')}",
        f"- vocabulary: {info['vocab_size']:,} ({info['dtype']}), eos id {info['eos_id']}",
        f"- bytes per token: train {info['train_bytes'] / max(c['train_tokens'], 1):.2f}, "
        f"val {info['val_bytes'] / max(c['val_tokens'], 1):.2f}",
        f"- tail tokens dropped: {info['tail_tokens_dropped']}",
        f"- tokenizer.json sha256: `{info['tokenizer_sha256']}`", *per_source])
    return result
