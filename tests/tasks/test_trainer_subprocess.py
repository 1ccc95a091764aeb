"""Train stage in its subprocess: output streamed, SIGKILL mid-run then bit-identical resume,
2-process DDP (torchrun, gloo on CPU) equal to one process, resume on another number of processes."""

import pytest
from registry_helpers import word_tokens
import torch
from safetensors.torch import load_file

import tasks.train as train_mod
from tasks import tracking, trainer
from tasks.config import ModelConfig, TrainConfig
from tasks.stage import StageResult

MODEL = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})


@pytest.fixture(scope="module", autouse=True)
def shared_mlflow(tmp_path_factory):
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        yield


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> StageResult:
    return word_tokens(tmp_path_factory, seed=1, n_docs=60, fp_char="e")


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=2,
                seed=5, device="cpu", threads=1)
    return TrainConfig(**{**base, **kw})


def _losses(ws, run_id):
    c = tracking.client(ws)
    return {m.step: m.value for m in sorted(c.get_metric_history(run_id, "train_loss"),
                                            key=lambda m: m.timestamp)}


def test_sigkill_then_resume_is_bit_identical(tokens, tmp_path, monkeypatch):
    ref = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, str(tmp_path / "a"), log=lambda m: None)
    ws = str(tmp_path / "b")
    monkeypatch.setenv(trainer.KILL_AT, "3")  # checkpoint at step 2, killed before step 3 (step 3 not saved)
    lines = []
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        train_mod.run_train(_cfg(), MODEL, tokens, ws, log=lines.append)
    assert any(line.startswith("step 2/6 loss") for line in lines), lines  # streamed from the child
    monkeypatch.delenv(trainer.KILL_AT)
    logs = []
    res = train_mod.run_train(_cfg(), MODEL, tokens, ws, log=logs.append)
    assert any("resuming" in m and "step 2" in m for m in logs), logs
    assert res.fingerprint == ref.fingerprint  # in_process is not part of the fingerprint
    assert _losses(ws, res.info["run_id"]) == _losses(str(tmp_path / "a"), ref.info["run_id"])
    a = load_file(f"{ref.info['model_dir']}/model.safetensors")
    b = load_file(f"{res.info['model_dir']}/model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_processes_equal_one_and_resume_on_one(tokens, tmp_path, monkeypatch):
    """Same global batch (4 rows: 2 per rank); DDP fails before step 5 (checkpoint at 4), and the
    run resumes on a single process from that checkpoint."""
    ref = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, str(tmp_path / "a"), log=lambda m: None)
    want = _losses(str(tmp_path / "a"), ref.info["run_id"])
    ws = str(tmp_path / "b")
    monkeypatch.setenv(trainer.FAIL_AT, "5")
    lines = []
    with pytest.raises(RuntimeError, match="injected failure before step 5"):
        train_mod.run_train(_cfg(nproc=2), MODEL, tokens, ws, log=lines.append)
    assert any("on 2 x cpu" in line for line in lines), lines
    monkeypatch.delenv(trainer.FAIL_AT)
    fp, out = train_mod.plan(_cfg(nproc=2), MODEL, tokens, ws)
    assert fp == ref.fingerprint
    run_id = tracking.client(ws).search_runs(
        [tracking.client(ws).get_experiment_by_name("neo-pipeline").experiment_id],
        f"tags.neo.train_fingerprint = '{fp}'")[0].info.run_id
    ddp = _losses(ws, run_id)
    assert sorted(ddp) == [1, 2, 3, 4, 5]
    for s in ddp:
        assert ddp[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s
    logs = []
    res = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, ws, log=logs.append)
    assert any("resuming" in m and "saved on 2 process(es), now 1" in m for m in logs), logs
    got = _losses(ws, res.info["run_id"])
    for s in (5, 6):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s
    a = load_file(f"{ref.info['model_dir']}/model.safetensors")
    b = load_file(f"{res.info['model_dir']}/model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
