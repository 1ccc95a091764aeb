"""Train stage: schedule, decay groups, accumulation, z-loss, NaN handling, exact resume in the same
MLflow run, init_from. Runs the loop in-process (fast); tests/tasks/train/test_trainer_subprocess.py covers
the subprocess, SIGKILL and torchrun paths."""

import json

import pytest
from registry_helpers import word_tokens
import torch
from safetensors.torch import load_file

import tasks.train.stage as train_mod
from tasks.train import faults, maths
from tasks.train.spec import TrainSpec
from tasks.core import tracking
from tasks.core.train_config import ModelConfig, TrainConfig
from tasks.core.protocol import StageResult


pytestmark = pytest.mark.usefixtures("shared_mlflow")  # tests/tasks/conftest.py


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> StageResult:
    return word_tokens(tmp_path_factory, seed=0, n_docs=60, fp_char="f")


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert maths.lr_at(0, cfg) == pytest.approx(0.1)
    assert maths.lr_at(9, cfg) == pytest.approx(1.0)
    assert maths.lr_at(10, cfg) == pytest.approx(1.0)
    assert maths.lr_at(60, cfg) == pytest.approx(0.55)
    assert maths.lr_at(110, cfg) == pytest.approx(0.1)


def test_durations_parse_and_a_budget_replaces_the_step_count():
    assert TrainConfig(max_time="2m").max_time == 120
    assert TrainConfig(max_time="1h30m", max_cpu_time=90).model_dump()["max_time"] == 5400
    assert TrainConfig(max_cpu_time="1.5h").max_cpu_time == 5400 and TrainConfig(max_time="45s").budgeted
    with pytest.raises(ValueError, match="'2 minutes' is not a duration"):
        TrainConfig(max_time="2 minutes")
    assert maths.total_steps(TrainConfig(max_time=60, max_steps=10), 4, 32) is None
    assert maths.budget_fraction(TrainConfig(max_time=10, max_cpu_time=40), 5.0, 30.0) == 0.75
    assert maths.budget_fraction(TrainConfig(), 5.0, 30.0) is None


def test_budgeted_schedule_follows_the_share_of_the_budget_used():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_time=60)
    assert maths.lr_at(0, cfg, 0.0) == pytest.approx(0.1)  # warmup ramp by steps
    assert maths.lr_at(50, cfg, 0.0) == pytest.approx(1.0)
    assert maths.lr_at(50, cfg, 0.5) == pytest.approx(0.55)
    assert maths.lr_at(50, cfg, 1.0) == pytest.approx(0.1)  # the floor at the budget's end
    assert maths.lr_at(50, cfg, 1.3) == pytest.approx(0.1)


def _cfg(**kw):
    base = dict(max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=3,
                seed=11, device="cpu", threads=1, in_process=True)
    return TrainConfig(**{**base, **kw})


MODEL = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})
QUIET = dict(log=lambda m: None)


def _weights(result):
    return load_file(f"{result.info['model_dir']}/model.safetensors")


def _losses(ws, run_id):
    c = tracking.client(ws)
    return {m.step: m.value for m in sorted(c.get_metric_history(run_id, "train_loss"),
                                            key=lambda m: m.timestamp)}


def test_decay_only_on_matrices():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = maths.make_optimizer(net, _cfg(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 4)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(4,), (4,), (4,)]


def test_z_loss_adds_squared_logsumexp():
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    model = lambda x, targets, return_logits=True: (logits, torch.nn.functional.cross_entropy(  # noqa: E731
        logits.view(-1, 5), targets.view(-1)))
    ce, obj = maths.step_loss(model, None, y, 0.0)
    assert obj is ce
    ce, obj = maths.step_loss(model, None, y, 1e-2)
    want = ce + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(obj, want)


def test_batch_shape_and_token_budget():
    assert maths.batch_shape(_cfg(batch_size=8, micro_batch_size=2), 32, 2) == (8, 4, 2)
    assert maths.batch_shape(_cfg(batch_tokens=100), 32, 1) == (4, 4, 1)
    assert maths.total_steps(_cfg(max_tokens=1000), 4, 32) == 8
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainConfig(batch_size=6, micro_batch_size=4)


def test_train_spec_round_trips_through_its_json_file(tmp_path):
    spec = TrainSpec(train=_cfg(z_loss=1e-4, peak_flops=1.5e12, micro_batch_size=2), model={"vocab_size": 300},
                     tokens_dir="/tokens", out_dir="/run", workspace="/ws", run_id="abc", fingerprint="f" * 16)
    path = spec.write(tmp_path / "train_spec.json")
    assert TrainSpec.read(path) == spec
    on_disk = json.loads(path.read_text())  # the layout of the spec files older runs left behind
    assert list(on_disk) == ["train", "model", "tokens_dir", "out_dir", "workspace", "run_id", "fingerprint",
                             "init_dir"]
    assert on_disk["train"] == spec.train.model_dump(mode="json") and on_disk["init_dir"] is None


def test_faults_come_from_the_environment(monkeypatch):
    for name in (faults.KILL_AT, faults.FAIL_AT, faults.NAN_AT):
        monkeypatch.delenv(name, raising=False)
    assert faults.Faults.from_env() == faults.Faults()
    monkeypatch.setenv(faults.FAIL_AT, "3")
    monkeypatch.setenv(faults.NAN_AT, "4, 5")
    f = faults.Faults.from_env()
    assert f == faults.Faults(fail_at=3, nan_steps=frozenset({4, 5}))
    f.before_step(3, resumed=True)  # a resumed run gets past the step it failed at
    f.before_step(2, resumed=False)
    with pytest.raises(RuntimeError, match="injected failure before step 3"):
        f.before_step(3, resumed=False)
    one = torch.tensor(1.0)
    ce, obj = f.poison(3, one, one)
    assert ce is one and obj is one
    assert all(t.isnan() for t in f.poison(4, one, one))


def test_accumulation_equals_one_big_batch(tokens, tmp_path):
    big = train_mod.run_train(_cfg(max_steps=3, batch_size=8), MODEL, tokens, str(tmp_path / "a"), **QUIET)
    acc = train_mod.run_train(_cfg(max_steps=3, batch_size=8, micro_batch_size=2), MODEL, tokens,
                              str(tmp_path / "b"), **QUIET)
    assert big.fingerprint != acc.fingerprint
    a, b = _weights(big), _weights(acc)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert acc.info["final_loss"] == pytest.approx(big.info["final_loss"], rel=1e-5)


def test_crash_then_resume_gives_identical_weights_and_same_run(tokens, tmp_path, monkeypatch):
    straight = train_mod.run_train(_cfg(val_every=4), MODEL, tokens, str(tmp_path / "a"), **QUIET)
    ref = _weights(straight)
    ws = str(tmp_path / "b")
    monkeypatch.setenv(faults.FAIL_AT, "7")
    with pytest.raises(RuntimeError, match="injected failure before step 7"):
        train_mod.run_train(_cfg(val_every=4), MODEL, tokens, ws, **QUIET)
    monkeypatch.delenv(faults.FAIL_AT)
    logs = []
    resumed = train_mod.run_train(_cfg(val_every=4), MODEL, tokens, ws, log=logs.append)
    assert any("resuming" in m and "step 6" in m for m in logs), logs
    got = _weights(resumed)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    assert resumed.info["final_loss"] == straight.info["final_loss"]
    assert resumed.info["val_loss"] == straight.info["val_loss"]
    # The resumed training kept logging into the run it started in: one run per training.
    c = tracking.client(ws)
    runs = c.search_runs([c.get_experiment_by_name("neo-pipeline").experiment_id],
                         f"tags.neo.train_fingerprint = '{resumed.fingerprint}'")
    assert sorted(r.info.run_id for r in runs) == sorted([straight.info["run_id"], resumed.info["run_id"]])
    assert straight.info["run_id"] != resumed.info["run_id"]
    rid = resumed.info["run_id"]
    assert _losses(ws, rid) == _losses(str(tmp_path / "a"), straight.info["run_id"])
    assert sorted({m.step for m in c.get_metric_history(rid, "train_loss")}) == [2, 4, 6, 8]
    assert sorted({m.step for m in c.get_metric_history(rid, "val_loss")}) == [4, 8]
    run = c.get_run(rid)
    assert {"tokens_per_s", "grad_norm", "lr", "peak_memory_mb", "skipped_steps"} <= set(run.data.metrics)
    assert run.data.tags["neo.init_from"] == "scratch"
    assert "loss_curve.png" in {a.path for a in c.list_artifacts(rid)}


def _history(ws, run_id, key):
    return {m.step: m.value for m in tracking.client(ws).get_metric_history(run_id, key)}


def test_time_budget_ends_annealed_and_a_resumed_run_keeps_the_budget(tokens, tmp_path, monkeypatch):
    budget = dict(max_time=3, max_steps=2, log_every=1, checkpoint_every=10, warmup_steps=5)
    ws = str(tmp_path)
    monkeypatch.setenv(faults.FAIL_AT, "25")
    with pytest.raises(RuntimeError, match="injected failure before step 25"):
        train_mod.run_train(_cfg(**budget), MODEL, tokens, ws, **QUIET)
    monkeypatch.delenv(faults.FAIL_AT)
    from neo_model.checkpoint import latest_checkpoint, read_state

    out = next((tmp_path / "train").iterdir())
    saved = read_state(latest_checkpoint(out / "checkpoints"))
    assert saved["wall_s"] > 0 and saved["cpu_s"] > 0  # step 20's checkpoint holds the time used so far
    res = train_mod.run_train(_cfg(**budget), MODEL, tokens, ws, **QUIET)
    info, rid = res.info, res.info["run_id"]
    assert res.counts["steps"] > 25  # max_steps (2) does not apply: the budget is the length
    assert info["train_wall_s"] >= 3.0  # the whole budget was used ...
    assert info["train_wall_s"] - saved["wall_s"] < 3.0  # ... the resumed process only used what was left
    lr, frac = _history(ws, rid, "lr"), _history(ws, rid, "budget_fraction")
    last = max(lr)
    assert last == res.counts["steps"] and frac[last] >= 1.0
    cfg = _cfg(**budget)
    for step in range(6, last + 1):  # each step's lr follows the share used before it
        assert lr[step] == pytest.approx(maths.lr_at(step - 1, cfg, frac[step - 1]), rel=1e-6)
        assert lr[step] <= lr[step - 1]
    assert lr[last] < 0.5 * cfg.lr and maths.lr_at(last, cfg, frac[last]) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    run = tracking.client(ws).get_run(rid)
    assert run.data.tags["neo.train_budget"] == "max_time=3.0 max_cpu_time=None"
    assert run.data.metrics["train_wall_s"] == pytest.approx(info["train_wall_s"])


def test_rerun_of_finished_training_is_reused(tokens, tmp_path):
    first = train_mod.run_train(_cfg(max_steps=3), MODEL, tokens, str(tmp_path), **QUIET)
    again = train_mod.run_train(_cfg(max_steps=3), MODEL, tokens, str(tmp_path), **QUIET)
    assert again.reused and again.fingerprint == first.fingerprint
    assert again.info["run_id"] == first.info["run_id"]


def test_nan_steps_are_skipped_and_counted(tokens, tmp_path, monkeypatch):
    monkeypatch.setenv(faults.NAN_AT, "4,5")
    res = train_mod.run_train(_cfg(nan_tolerance=3), MODEL, tokens, str(tmp_path), **QUIET)
    assert res.counts["steps"] == 8 and res.info["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in _weights(res).values())


def test_consecutive_nans_stop_with_a_clear_error_and_keep_checkpoints(tokens, tmp_path, monkeypatch):
    monkeypatch.setenv(faults.NAN_AT, "4,5,6,7")
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*step 7.*checkpoint \(step 3\)"):
        train_mod.run_train(_cfg(nan_tolerance=3), MODEL, tokens, str(tmp_path), **QUIET)
    fp, out = train_mod.plan(_cfg(nan_tolerance=3), MODEL, tokens, str(tmp_path))
    # no checkpoint is written inside a streak of skipped steps: step 3 stays the newest
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003"]


def test_init_from_an_earlier_model_is_recorded_and_used(tokens, tmp_path):
    ws = str(tmp_path)
    first = train_mod.run_train(_cfg(max_steps=8, log_every=1), MODEL, tokens, ws, **QUIET)
    cont = train_mod.run_train(_cfg(max_steps=2, log_every=1, init_from=first.info["model_dir"]), MODEL,
                               tokens, ws, **QUIET)
    scratch_first = _losses(ws, first.info["run_id"])[1]
    assert _losses(ws, cont.info["run_id"])[1] < scratch_first - 0.3
    tags = tracking.client(ws).get_run(cont.info["run_id"]).data.tags
    assert tags["neo.init_from"] == first.info["model_dir"]
    # a registered model: its version's run holds the HF files under hf_model/ (as register logs them)
    c = tracking.client(ws)
    c.log_artifacts(first.info["run_id"], first.info["model_dir"], "hf_model")
    c.create_registered_model("neo-init-test")
    mv = c.create_model_version("neo-init-test", f"runs:/{first.info['run_id']}/hf_model",
                                run_id=first.info["run_id"])
    c.set_registered_model_alias("neo-init-test", "champion", mv.version)
    reg = train_mod.run_train(_cfg(max_steps=2, log_every=1, init_from="models:/neo-init-test@champion"),
                              MODEL, tokens, ws, **QUIET)
    assert _losses(ws, reg.info["run_id"]) == _losses(ws, cont.info["run_id"])
    assert c.get_run(reg.info["run_id"]).data.tags["neo.init_from"] == "models:/neo-init-test@champion"
    with pytest.raises(ValueError, match="init_from"):
        train_mod.run_train(_cfg(init_from=str(tmp_path / "nowhere")), MODEL, tokens, ws, **QUIET)


def test_launch_settings_are_not_fingerprinted_and_torchrun_flags(tokens, tmp_path):
    base = dict(max_steps=8, batch_size=8, seed=11)
    fp = train_mod.plan(TrainConfig(**base), MODEL, tokens, str(tmp_path))[0]
    multi = TrainConfig(**base, nproc=4, nnodes=2, rdzv_endpoint="head:29500", parallel="fsdp")
    assert train_mod.plan(multi, MODEL, tokens, str(tmp_path))[0] == fp
    assert train_mod.plan(TrainConfig(**{**base, "seed": 12}), MODEL, tokens, str(tmp_path))[0] != fp
    assert train_mod.torchrun_args(TrainConfig(nproc=2)) == ["--standalone", "--nproc_per_node=2"]
    assert train_mod.torchrun_args(multi, node_rank=1) == [
        "--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--master_addr=head", "--master_port=29500"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        TrainConfig(nnodes=2)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        TrainConfig(nnodes=2, rdzv_endpoint="head")  # no port
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")


def test_host_process_count_overrides_nproc_at_launch(monkeypatch):
    cfg = TrainConfig(max_steps=8, batch_size=8, micro_batch_size=2)
    monkeypatch.delenv(train_mod.NPROC_ENV, raising=False)
    assert train_mod.host_settings(cfg).nproc == 1
    monkeypatch.setenv(train_mod.NPROC_ENV, "4")
    assert train_mod.host_settings(cfg).nproc == 4
    assert train_mod.host_settings(cfg).model_dump(exclude={"nproc"}) == cfg.model_dump(exclude={"nproc"})
    monkeypatch.setenv(train_mod.NPROC_ENV, "3")  # 8 is not a multiple of 2 * 3
    with pytest.raises(ValueError, match="NEO_TRAIN_NPROC='3'.*micro_batch_size"):
        train_mod.host_settings(cfg)
    monkeypatch.setenv(train_mod.NPROC_ENV, "all")
    with pytest.raises(ValueError, match="not a whole number"):
        train_mod.host_settings(cfg)


def test_checkpoint_weights_load_from_sharded_files(tmp_path):
    """1.3B and 2.7B weights exceed the 5 GB shard limit: a checkpoint then holds HF shards + index."""
    from neo_model import GPTNeo, GPTNeoConfig
    from neo_model.checkpoint import load_weights

    cfg = GPTNeoConfig.from_preset("debug", vocab_size=300, max_position_embeddings=64)
    torch.manual_seed(0)
    saved = GPTNeo(cfg)
    saved.save_pretrained(tmp_path, max_shard_size=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    torch.manual_seed(1)
    loaded = GPTNeo(cfg)
    load_weights(tmp_path, loaded)
    want = saved.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
