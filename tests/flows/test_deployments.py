"""prefect.yaml: every deployment's entrypoint loads, its parameters validate, schedules parse."""
import importlib
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule

from tasks.core.config import load_config, resolve_config

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_the_three_deployments_and_their_pools():
    by_name = {d["name"]: d for d in SPEC["deployments"]}
    assert set(by_name) == {"retrain", "data-refresh", "train-eval-register"}
    assert by_name["retrain"]["work_pool"]["name"] == "cpu"
    assert by_name["data-refresh"]["work_pool"]["name"] == "cpu"
    assert by_name["train-eval-register"]["work_pool"]["name"] == "gpu"
    assert by_name["retrain"]["concurrency_limit"] == 1
    cron = CronSchedule(**by_name["retrain"]["schedules"][0])
    assert cron.cron == "0 3 * * 1" and cron.timezone == "UTC"


@pytest.mark.parametrize("dep", SPEC["deployments"], ids=lambda d: d["name"])
def test_entrypoint_loads_and_parameters_validate(dep):
    fl = _flow(dep["entrypoint"])
    params = dict(dep.get("parameters") or {})
    if dep["name"] == "train-eval-register":
        params["tokens_dir"] = "/data/tokens/abc"
    validated = fl.validate_parameters(params)
    if "preset" in params:  # what the run will run: the named preset, not defaults under its name
        assert resolve_config(validated["config"], validated["preset"], validated.get("overrides")) \
            == load_config(params["preset"])
    handoff = dep.get("parameters", {}).get("train_deployment")
    if handoff:  # retrain hands over to a deployment defined here, by "<flow name>/<deployment>"
        flow_name, dep_name = handoff.split("/")
        target = next(d for d in SPEC["deployments"] if d["name"] == dep_name)
        assert _flow(target["entrypoint"]).name == flow_name


def test_preset_and_overrides_run_that_preset_and_fail_like_set_before_any_work(tmp_path):
    """`--param preset=debug --param overrides=...` runs the debug preset with the override; a wrong
    preset or key fails the run at once with `neo run --set`'s message and writes nothing."""
    from prefect.testing.utilities import prefect_test_harness

    data = _flow("flows/data.py:neo_data")
    ws = tmp_path / "ws"
    with prefect_test_harness(server_startup_timeout=180):
        for params, message in [({"preset": "nosuch"}, "config preset 'nosuch' not found"),
                                ({"preset": "debug", "overrides": {"train.max_stepz": 3}},
                                 "invalid config: train.max_stepz: Extra inputs are not permitted")]:
            state = data(workspace=str(ws), **params, return_state=True)
            assert state.is_failed() and message in str(state.message), state.message
    assert not ws.exists()
    cfg = resolve_config(preset="debug", overrides={"train.max_steps": 800})
    assert cfg.train.max_steps == 800 and cfg.model == load_config("debug").model


def test_a_bad_parameter_is_refused_naming_the_key():
    from prefect.exceptions import ParameterTypeError

    fl = _flow("flows/pipeline.py:neo_pipeline")
    with pytest.raises(ParameterTypeError, match="max_steps"):
        fl.validate_parameters({"config": {"train": {"max_steps": -3}}})
