"""MLflow location and run helpers shared by train, evaluate and register.

Embedded default: tracking and registry in `sqlite:///<workspace>/mlflow/mlflow.db` with artifacts
under `<workspace>/mlflow/artifacts` (for a workspace on S3, `<workspace URL>/mlflow/artifacts`, the
SQLite store staying in the local working copy). Setting `MLFLOW_TRACKING_URI` (and optionally
`MLFLOW_REGISTRY_URI`) points every stage at a real server instead, with no code change.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core import storage

if TYPE_CHECKING:  # MLflow is imported where it is used: importing a stage's logic loads none of it
    from mlflow.tracking import MlflowClient

ARTIFACT_PROTOCOLS = ("s3://", "gs://", "wasbs://", "abfss://", "hdfs://")
"""Workspace URLs MLflow can also store artifacts under (S3 needs boto3 and, for an S3-compatible
endpoint, `MLFLOW_S3_ENDPOINT_URL`)."""


def tracking_uri(workspace: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(workspace).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def client(workspace: str | Path) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(workspace)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI", uri))


def use_workspace(workspace: str | Path) -> None:
    """Point MLflow's fluent API (needed by log_model / register_model) at the workspace store."""
    import mlflow

    uri = tracking_uri(workspace)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))


def experiment_id(c: MlflowClient, name: str, workspace: str | Path) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    # A tracking server decides its own artifact root; a database URI alone would put artifacts in
    # ./mlruns of whatever directory the process runs in, so they go to the workspace instead.
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://", "databricks")):
        local = Path(workspace).resolve() / "mlflow" / "artifacts"
        remote = storage.remote_url(local)  # a workspace on shared storage keeps artifacts there
        location = remote if remote and remote.startswith(ARTIFACT_PROTOCOLS) else local.as_uri()
    return c.create_experiment(name, artifact_location=location)


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
