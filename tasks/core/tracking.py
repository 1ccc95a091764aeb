"""MLflow location and run helpers shared by train, evaluate and register.

Embedded default: tracking and registry in `sqlite:///<workspace>/mlflow/mlflow.db` with artifacts
under `<workspace>/mlflow/artifacts` (for a workspace on S3, `<workspace URL>/mlflow/artifacts`, the
SQLite store staying in the local working copy). Setting `MLFLOW_TRACKING_URI` (and optionally
`MLFLOW_REGISTRY_URI`) points every stage at a real server instead, with no code change.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

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


def registry_uri(tracking: str) -> str:
    """The model registry: `MLFLOW_REGISTRY_URI` when set, else the tracking store itself."""
    return os.environ.get("MLFLOW_REGISTRY_URI", tracking)


def client(workspace: str | Path) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(workspace)
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri(uri))


@contextlib.contextmanager
def fluent(workspace: str | Path) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model, pyfunc.load_model) pointed at the workspace's
    store for the block. MLflow's setters also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI to
    the environment, which would pin every later workspace of this process (a worker, a test session)
    to this one: both variables and MLflow's own settings are put back afterwards."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before = tracking_utils._tracking_uri, registry_utils._registry_uri
    uri = tracking_uri(workspace)
    registry = registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        registry_utils._registry_uri = before[1]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """MLflow's event lines (`Successfully registered model ...`, `Created version ...`) kept out of
    the user's output for the block: the version and alias are reported by the register stage."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


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
