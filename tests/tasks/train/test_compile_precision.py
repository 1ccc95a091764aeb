"""train.compile (auto | true | false) and train.precision (auto | fp32 | bf16) through the trainer's
own code path on CPU: compiled and eager training give the same losses, and bf16 autocast trains."""

import pytest
import torch
from registry_helpers import word_tokens
from safetensors.torch import load_file

import tasks.train.stage as train_mod
from neo_model import GPTNeo, GPTNeoConfig
from tasks.core import tracking
from tasks.core.train_config import ModelConfig, TrainConfig
from tasks.train import accel

pytestmark = pytest.mark.usefixtures("shared_mlflow")  # tests/tasks/conftest.py

MODEL = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return word_tokens(tmp_path_factory, seed=0, n_docs=60, fp_char="c")


def _cfg(**kw):
    base = dict(max_steps=20, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=100,
                seed=11, device="cpu", threads=1, in_process=True, compile=False)
    return TrainConfig(**{**base, **kw})


def _run(tokens, path, **kw):
    logs = []
    res = train_mod.run_train(_cfg(**kw), MODEL, tokens, str(path), log=logs.append)
    c = tracking.client(str(path))
    hist = {m.step: m.value for m in c.get_metric_history(res.info["run_id"], "train_loss")}
    losses = torch.tensor([hist[s] for s in range(1, 21)], dtype=torch.float64)
    return res, losses, "\n".join(logs)


def test_compile_and_precision_settings_resolve_per_device():
    assert TrainConfig().compile == "auto" and TrainConfig().precision == "auto"
    for given, want in [("auto", "auto"), (True, True), ("false", False), ("on", True), ("0", False)]:
        assert TrainConfig(compile=given).compile == want
    with pytest.raises(ValueError, match="auto, true or false"):
        TrainConfig(compile="sometimes")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = TrainConfig()
    assert accel.use_compile(auto, cuda) and not accel.use_compile(auto, cpu)
    assert not accel.use_compile(TrainConfig(compile=False), cuda)
    assert accel.use_compile(TrainConfig(compile=True), cpu)
    assert not accel.use_bf16(auto, cpu) and accel.use_bf16(auto, cuda)
    assert accel.use_bf16(TrainConfig(precision="bf16"), cpu)
    assert not accel.use_bf16(TrainConfig(precision="fp32"), cuda)


def test_compiled_training_gives_the_eager_losses_and_bf16_autocast_trains(tokens, tmp_path):
    eager, ref, log = _run(tokens, tmp_path / "eager")
    assert "process) in fp32:" in log and "compiled" not in log
    compiled, got, log = _run(tokens, tmp_path / "compiled", compile=True)
    assert "process) in fp32, compiled:" in log
    assert ref[-1] < ref[0] - 0.5  # it trains
    # 20 steps of AdamW: inductor's fused kernels round differently from eager, nothing more
    print(f"compiled vs eager: max relative loss difference {((got - ref).abs() / ref).max():.2e}")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
    w_eager = load_file(f"{eager.info['model_dir']}/model.safetensors")
    w_comp = load_file(f"{compiled.info['model_dir']}/model.safetensors")
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], rtol=1e-3, atol=1e-4, msg=k)

    # bf16 autocast on CPU through the same trainer code (the CUDA default), compiled as on a GPU
    bf16, low, log = _run(tokens, tmp_path / "bf16", precision="bf16", compile=True)
    assert "process) in bf16 autocast, compiled:" in log
    assert torch.isfinite(low).all() and low[-1] < low[0] - 0.5
    print(f"bf16 vs fp32: max relative loss difference {((low - ref).abs() / ref).max():.2e}")
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0)  # bf16 matmuls: ~1% of the fp32 loss
    torch.manual_seed(11)  # the trainer's initial weights (build_model seeds with train.seed)
    init = GPTNeo(GPTNeoConfig.from_preset("debug", max_position_embeddings=64)).state_dict()
    w_bf16 = load_file(f"{bf16.info['model_dir']}/model.safetensors")
    assert all(w.dtype == torch.float32 for w in w_bf16.values())  # fp32 master weights
    assert (w_bf16["transformer.h.0.mlp.c_fc.weight"] - init["transformer.h.0.mlp.c_fc.weight"]).abs().max() > 1e-3
