"""Train stage: schedule, deterministic batches, exact resume after a crash in the same MLflow run."""
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import tasks.train as train_mod
from tasks import tracking
from tasks.config import ModelConfig, TokenizerConfig, TrainConfig
from tasks.stage import StageResult
from tasks.tokenize import run_tokenize


@pytest.fixture(scope="module", autouse=True)
def shared_mlflow(tmp_path_factory):
    """One MLflow database for the module: creating a fresh one costs seconds."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        yield


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> StageResult:
    docs_dir = tmp_path_factory.mktemp("dedup")
    rng = random.Random(0)
    words = "def return value index self import class for in if else None True".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(60, 200))) for _ in range(60)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(60)], "text": texts, "source": ["t"] * 60}),
                   docs_dir / "docs-00000.parquet")
    upstream = StageResult(stage="dedup", fingerprint="f" * 16, path=str(docs_dir))
    ws = tmp_path_factory.mktemp("ws")
    return run_tokenize(TokenizerConfig(vocab_size=300, seq_len=32, val_fraction=0.2), upstream, str(ws))


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train_mod.lr_at(0, cfg) == pytest.approx(0.1)
    assert train_mod.lr_at(9, cfg) == pytest.approx(1.0)
    assert train_mod.lr_at(10, cfg) == pytest.approx(1.0)
    assert train_mod.lr_at(60, cfg) == pytest.approx(0.55)
    assert train_mod.lr_at(110, cfg) == pytest.approx(0.1)


def test_batches_depend_only_on_step_and_cover_each_epoch():
    n, bs = 10, 4
    first = [train_mod.batch_indices(s, bs, n, seed=3) for s in range(5)]  # 20 samples = 2 epochs
    again = [train_mod.batch_indices(s, bs, n, seed=3) for s in range(5)]
    assert all((a == b).all() for a, b in zip(first, again))
    flat = np.concatenate(first)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not (flat[:10] == flat[10:]).all(), "each epoch gets its own permutation"


def _cfg(**kw):
    base = dict(max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=3,
                seed=11, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_crash_then_resume_gives_identical_weights_and_same_run(tokens, tmp_path, monkeypatch):
    model = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})
    straight = train_mod.run_train(_cfg(), model, tokens, str(tmp_path / "a"), log=lambda m: None)
    ref = load_file(f"{straight.info['model_dir']}/model.safetensors")

    real_lr = train_mod.lr_at

    def crash_at_7(step, cfg):
        if step == 7:
            raise RuntimeError("simulated crash")
        return real_lr(step, cfg)

    ws = str(tmp_path / "b")
    monkeypatch.setattr(train_mod, "lr_at", crash_at_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.run_train(_cfg(), model, tokens, ws, log=lambda m: None)
    monkeypatch.setattr(train_mod, "lr_at", real_lr)
    logs = []
    resumed = train_mod.run_train(_cfg(), model, tokens, ws, log=logs.append)
    assert any("resuming" in m and "step 6" in m for m in logs), logs
    got = load_file(f"{resumed.info['model_dir']}/model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    assert resumed.info["final_loss"] == straight.info["final_loss"]
    # The resumed training kept logging into the run it started in: one run per training.
    c = tracking.client(ws)
    runs = c.search_runs([c.get_experiment_by_name("neo-pipeline").experiment_id],
                         f"tags.neo.train_fingerprint = '{resumed.fingerprint}'")
    assert sorted(r.info.run_id for r in runs) == sorted([straight.info["run_id"], resumed.info["run_id"]])
    assert straight.info["run_id"] != resumed.info["run_id"]
    steps = [m.step for m in c.get_metric_history(resumed.info["run_id"], "train_loss")]
    assert sorted(set(steps)) == [2, 4, 6, 8]


def test_rerun_of_finished_training_is_reused(tokens, tmp_path):
    model = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})
    first = train_mod.run_train(_cfg(max_steps=3), model, tokens, str(tmp_path), log=lambda m: None)
    again = train_mod.run_train(_cfg(max_steps=3), model, tokens, str(tmp_path), log=lambda m: None)
    assert again.reused and again.fingerprint == first.fingerprint
    assert again.info["run_id"] == first.info["run_id"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tokens, tmp_path, monkeypatch):
    model = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})
    real_lr = train_mod.lr_at
    monkeypatch.setattr(train_mod, "lr_at", lambda step, cfg: math.nan if step >= 4 else real_lr(step, cfg))
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 5.*step 3"):
        train_mod.run_train(_cfg(), model, tokens, str(tmp_path), log=lambda m: None)
    fp, out = train_mod.plan(_cfg(), model, tokens, str(tmp_path))
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000003"]
