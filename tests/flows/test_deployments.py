"""prefect.yaml: every deployment's entrypoint loads, its parameters validate, schedules parse."""
import importlib
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule

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
    if "config" in params:
        assert validated["config"].name == params["config"]["name"]
    handoff = dep.get("parameters", {}).get("train_deployment")
    if handoff:  # retrain hands over to a deployment defined here, by "<flow name>/<deployment>"
        flow_name, dep_name = handoff.split("/")
        target = next(d for d in SPEC["deployments"] if d["name"] == dep_name)
        assert _flow(target["entrypoint"]).name == flow_name


def test_a_bad_parameter_is_refused_naming_the_key():
    from prefect.exceptions import ParameterTypeError

    fl = _flow("flows/pipeline.py:neo_pipeline")
    with pytest.raises(ParameterTypeError, match="max_steps"):
        fl.validate_parameters({"config": {"train": {"max_steps": -3}}})
