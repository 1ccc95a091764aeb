"""The `debug` preset, run stage by stage as `neo run -c debug` runs it, ends clearly below the unigram
baseline on its own validation split (issue 17: by at least 10%), so the gate may crown it."""
import pytest

from neo_model import GPTNeo
from tasks.clean.stage import run_clean
from tasks.core.config import load_config
from tasks.dedup.stage import run_dedup
from tasks.download.stage import run_download
from tasks.evaluate.stage import validation_metrics
from tasks.tokenize.stage import run_tokenize
from tasks.train.stage import run_train

pytestmark = pytest.mark.usefixtures("shared_mlflow")  # tests/tasks/conftest.py


def test_debug_preset_beats_the_unigram_baseline_by_ten_percent(tmp_path):
    cfg = load_config("debug")
    ws = str(tmp_path)
    raw = run_download(cfg.corpus, ws)
    tokens = run_tokenize(cfg.tokenizer, run_dedup(cfg.dedup, run_clean(cfg.clean, raw, ws), ws), ws)
    train = cfg.train.model_copy(update={"in_process": True, "device": "cpu"})  # what it computes: unchanged
    trained = run_train(train, cfg.model, tokens, ws, log=lambda m: None)
    assert trained.counts["steps"] == cfg.train.max_steps == 200
    metrics, _ = validation_metrics(cfg.eval, GPTNeo.from_pretrained(trained.info["model_dir"]), tokens.path)
    assert metrics["val_tokens"] > 1000
    assert metrics["val_bpb"] <= 0.9 * metrics["unigram_val_bpb"], metrics
