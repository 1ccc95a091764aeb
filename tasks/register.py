"""Register stage: log the trained model into its training run and register it with an alias.

Everything lands in the MLflow run the train stage opened: params (the whole config, secrets
redacted), the evaluation metrics (already logged by evaluate), the stage manifests as lineage and the
samples as artifacts, and the model as a pyfunc text generator plus its Hugging Face files. The new
version gets alias `champion` when it beats the current champion on the registry metric (lower is
better) or there is none, else `challenger`. Re-running (a retry, a lost cache) never registers the
same training twice: a version is looked up by its fingerprint tag first.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.exceptions import MlflowException

from tasks import tracking
from tasks.config import RegistryConfig
from tasks.stage import (StageResult, code_version, file_entry, fingerprint, prepare_dir,
                         read_manifest, result_from_manifest, stable_hash, stage_dir, write_json_atomic,
                         write_manifest)

STAGE = "register"
VERSION = 1
INFO_KEYS = ("model_name", "version", "alias", "run_id", "metric", "champion_before")
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
NEO_MODEL_DIR = Path(__file__).resolve().parent.parent / "neo_model"
PIP_REQUIREMENTS = ["torch==2.13.0", "tokenizers", "safetensors", "numpy", "pandas"]


def plan(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult],
         params: dict[str, str], workspace: str) -> tuple[str, Path]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, cfg, [upstream.fingerprint, *(r.fingerprint for r in lineage),
                                  stable_hash(params)], code)
    return fp, stage_dir(workspace, "registry", fp)


def decide_alias(candidate: float, champion: float | None, cfg: RegistryConfig) -> str:
    """Lower is better; ties keep the current champion."""
    if champion is None or candidate < champion:
        return cfg.champion_alias
    return cfg.challenger_alias


def _champion_metric(c, cfg: RegistryConfig) -> tuple[str | None, float | None]:
    try:
        mv = c.get_model_version_by_alias(cfg.model_name, cfg.champion_alias)
    except MlflowException:  # no registered model yet, or no champion alias
        return None, None
    value = c.get_run(mv.run_id).data.metrics.get(cfg.metric) if mv.run_id else None
    return mv.version, value


def _existing_version(c, cfg: RegistryConfig, fp: str):
    try:
        found = c.search_model_versions(f"name = '{cfg.model_name}' and tags.neo_fingerprint = '{fp}'")
    except MlflowException:
        return None
    return found[0] if found else None


def _log_model(run_id: str, model_dir: str, workspace: str) -> str:
    import mlflow

    tracking.use_workspace(workspace)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_FILE),
                                       artifacts={"model": model_dir}, code_paths=[str(NEO_MODEL_DIR)],
                                       pip_requirements=PIP_REQUIREMENTS)
        mlflow.log_artifacts(model_dir, artifact_path="hf_model")
    return info.model_uri


def run_register(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult],
                 params: dict[str, str], workspace: str) -> StageResult:
    fp, out = plan(cfg, upstream, lineage, params, workspace)
    if (m := read_manifest(out)) is not None:
        return result_from_manifest(out, m, reused=True, info_keys=INFO_KEYS)
    started = time.time()
    prepare_dir(out)
    metrics = upstream.info["metrics"]
    if cfg.metric not in metrics:
        raise ValueError(f"registry.metric {cfg.metric!r} is not an evaluation metric "
                         f"(known: {', '.join(sorted(metrics))})")
    run_id, model_dir = upstream.info["run_id"], upstream.info["model_dir"]
    c = tracking.client(workspace)

    mv = _existing_version(c, cfg, fp)
    if mv is None:
        logged = {k for k in c.get_run(run_id).data.params}
        c.log_batch(run_id, params=[_param(k, v) for k, v in params.items() if k not in logged])
        for r in [*lineage, upstream]:
            c.log_artifact(run_id, str(Path(r.path) / "manifest.json"), artifact_path=f"lineage/{r.stage}")
        c.log_artifact(run_id, upstream.info["samples_path"], artifact_path="eval")
        model_uri = _log_model(run_id, model_dir, workspace)
        import mlflow

        tracking.use_workspace(workspace)
        mv = mlflow.register_model(model_uri, cfg.model_name,
                                   tags={"neo_fingerprint": fp, "neo_run_id": run_id})
    champion_version, champion_value = _champion_metric(c, cfg)
    if champion_version == mv.version:
        alias = cfg.champion_alias  # a rerun after this version was already promoted
    else:
        alias = decide_alias(metrics[cfg.metric], champion_value, cfg)
        c.set_registered_model_alias(cfg.model_name, alias, mv.version)
    c.set_model_version_tag(cfg.model_name, mv.version, cfg.metric, str(metrics[cfg.metric]))
    record = {"model_name": cfg.model_name, "version": str(mv.version), "alias": alias, "run_id": run_id,
              "metric": {cfg.metric: metrics[cfg.metric]},
              "champion_before": {"version": champion_version, cfg.metric: champion_value}}
    write_json_atomic(out / "registration.json", record)
    manifest = write_manifest(out, stage=STAGE, fp=fp, code=code_version(__name__, VERSION), config=cfg,
                              inputs=[upstream.fingerprint, *(r.fingerprint for r in lineage)],
                              counts={"registered": 1}, files=[file_entry(out / "registration.json", out)],
                              started=started, **record)
    return result_from_manifest(out, manifest, reused=False, info_keys=INFO_KEYS)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value[:6000])


# ---------------------------------------------------------------------------- Prefect wrapper

from prefect import get_run_logger  # noqa: E402
from prefect.artifacts import create_link_artifact  # noqa: E402

from tasks.prefect_stage import report, stage_task  # noqa: E402


@stage_task(STAGE, plan, retries=3)
def register(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult],
             params: dict[str, str], workspace: str) -> StageResult:
    """Log and register the model in MLflow; alias champion or challenger by the registry metric."""
    result = run_register(cfg, upstream, lineage, params, workspace)
    i = result.info
    get_run_logger().info(f"registered {i['model_name']} version {i['version']} as @{i['alias']}")
    report(STAGE, result, [f"- model: `{i['model_name']}` version {i['version']} alias `@{i['alias']}`",
                           f"- {json.dumps(i['metric'])}; champion before: {json.dumps(i['champion_before'])}"])
    uri = tracking.tracking_uri(workspace)
    if uri.startswith("http"):
        create_link_artifact(key="registered-model", link=f"{uri}/#/models/{i['model_name']}/versions/"
                             f"{i['version']}", description="MLflow model version")
    return result
