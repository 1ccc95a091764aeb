"""Register stage: champion/challenger by metric, everything in the training run, idempotent."""
import json
import shutil

import pytest
import torch

from neo_model import GPTNeo, GPTNeoConfig
from tasks import tracking
from tasks.config import RegistryConfig
from tasks.register import decide_alias, run_register
from tasks.stage import StageResult
from tasks.tokenize import train_tokenizer


def test_decide_alias_lower_is_better_and_ties_keep_champion():
    cfg = RegistryConfig()
    assert decide_alias(1.0, None, cfg) == "champion"
    assert decide_alias(0.9, 1.0, cfg) == "champion"
    assert decide_alias(1.0, 1.0, cfg) == "challenger"
    assert decide_alias(1.1, 1.0, cfg) == "challenger"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPTNeo(GPTNeoConfig.from_preset("debug")).save_pretrained(d)
    train_tokenizer(["def f(x):\n    return x\n"] * 20, 300).save(str(d / "tokenizer.json"))
    return d


def _evaluation(ws, model_dir, bpb: float, tag: str) -> StageResult:
    c = tracking.client(ws)
    exp = tracking.experiment_id(c, "neo-pipeline", ws)
    run_id = c.create_run(exp, run_name=tag).info.run_id
    tracking.log_metrics(c, run_id, {"val_bpb": bpb})
    d = ws / f"eval-{tag}"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"stage": "evaluate"}))
    (d / "samples.json").write_text(json.dumps([{"prompt": "def", "completion": " f"}]))
    return StageResult(stage="evaluate", fingerprint=f"{tag:0<16}", path=str(d),
                       info={"metrics": {"val_bpb": bpb}, "run_id": run_id, "model_dir": str(model_dir),
                             "samples_path": str(d / "samples.json")})


def test_promotion_sequence_and_idempotent_rerun(tmp_path, model_dir):
    ws = tmp_path
    cfg = RegistryConfig(model_name="neo-test")
    params = {"train.lr": "0.001", "storage.password": "***"}
    first = run_register(cfg, _evaluation(ws, model_dir, 1.5, "a"), [], params, str(ws))
    worse = run_register(cfg, _evaluation(ws, model_dir, 1.7, "b"), [], params, str(ws))
    better = run_register(cfg, _evaluation(ws, model_dir, 1.2, "c"), [], params, str(ws))
    assert [(r.info["version"], r.info["alias"]) for r in (first, worse, better)] == \
        [("1", "champion"), ("2", "challenger"), ("3", "champion")]
    assert better.info["champion_before"] == {"version": 1, "val_bpb": 1.5}
    c = tracking.client(ws)
    assert str(c.get_model_version_by_alias("neo-test", "champion").version) == "3"
    mv = c.get_model_version("neo-test", "1")
    assert mv.run_id == first.info["run_id"]
    run = c.get_run(first.info["run_id"])
    assert run.data.params == params
    assert {a.path for a in c.list_artifacts(first.info["run_id"])} >= {"eval", "hf_model"}
    # Losing the stage directory (or a retry after a partial failure) must not register twice.
    shutil.rmtree(better.path)
    again = run_register(cfg, _evaluation_for(better, ws, model_dir), [], params, str(ws))
    assert again.info["version"] == "3" and again.info["alias"] == "champion"
    assert len(c.search_model_versions("name = 'neo-test'")) == 3


def _evaluation_for(result: StageResult, ws, model_dir) -> StageResult:
    """The same evaluation input that produced `result` (same fingerprint, same run)."""
    d = ws / "eval-c"
    return StageResult(stage="evaluate", fingerprint=f"{'c':0<16}", path=str(d),
                       info={"metrics": {"val_bpb": 1.2}, "run_id": result.info["run_id"],
                             "model_dir": str(model_dir), "samples_path": str(d / "samples.json")})
