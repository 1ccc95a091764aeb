"""Shared builders for registry tests: a tiny token stage, short trainings, evaluation results."""
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import tasks.train.stage as train_mod
from tasks.core import tracking
from tasks.core.data_config import TokenizerConfig
from tasks.core.train_config import ModelConfig, TrainConfig
from tasks.core.protocol import StageResult
from tasks.tokenize.rows import read_rows
from tasks.tokenize.stage import run_tokenize

WORDS = "def return value index self import class for in if else None True print".split()
_rng = random.Random(0)
TEXTS = [" ".join(_rng.choice(WORDS) for _ in range(_rng.randint(40, 120))) for _ in range(80)]


def make_tokens(docs_dir: Path, ws: Path) -> StageResult:
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(80)], "text": TEXTS, "source": ["t"] * 80}),
                   docs_dir / "docs-00000.parquet")
    upstream = StageResult(stage="dedup", fingerprint="d" * 16, path=str(docs_dir))
    return run_tokenize(TokenizerConfig(vocab_size=300, seq_len=32, val_fraction=0.2), upstream, str(ws))


def trained(ws: Path, tokens: StageResult, steps: int) -> StageResult:
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, log_every=5,
                      checkpoint_every=1000, seed=1, device="cpu")
    return train_mod.run_train(cfg, ModelConfig(preset="debug", overrides={"max_position_embeddings": 64}),
                               tokens, str(ws), log=lambda m: None)


def evaluation(ws: Path, result: StageResult, tag: str, bpb: float, tokens: StageResult) -> StageResult:
    """An evaluate result for `result` claiming `bpb` on `tokens`' whole val split (unigram: 3.0)."""
    d = ws / f"eval-{tag}"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": "evaluate", "code_version": "v1-x"}))
    (d / "samples.json").write_text(json.dumps([{"prompt": "def", "completion": " f"}]))
    rows, n_bytes = read_rows(tokens.path, "val")
    metrics = {"val_bpb": bpb, "val_ppl": 2.0, "unigram_val_bpb": 3.0,
               "val_tokens": float(rows.shape[0] * (rows.shape[1] - 1)), "val_bytes": float(n_bytes.sum())}
    tracking.log_metrics(tracking.client(ws), result.info["run_id"], metrics)
    return StageResult(stage="evaluate", fingerprint=f"{tag:e<16}", path=str(d),
                       info={"metrics": metrics, "run_id": result.info["run_id"],
                             "model_dir": result.info["model_dir"], "samples_path": str(d / "samples.json")})


TRAIN_WORDS = "def return value index self import class for in if else None True".split()


def word_tokens(tmp_path_factory, seed: int, n_docs: int, fp_char: str) -> StageResult:
    """A tokenize stage (vocab 300, seq_len 32) over `n_docs` random word documents."""
    docs_dir = tmp_path_factory.mktemp("dedup")
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(60, 200))) for _ in range(n_docs)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n_docs)], "text": texts, "source": ["t"] * n_docs}),
                   docs_dir / "docs-00000.parquet")
    upstream = StageResult(stage="dedup", fingerprint=fp_char * 16, path=str(docs_dir))
    ws = tmp_path_factory.mktemp("ws")
    return run_tokenize(TokenizerConfig(vocab_size=300, seq_len=32, val_fraction=0.2), upstream, str(ws))
