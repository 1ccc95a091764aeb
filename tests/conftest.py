"""Test-wide settings: offline, no telemetry, Prefect and MLflow isolated in temporary directories.

Environment variables are set at import time, before any test module imports Prefect or MLflow,
because both read their settings when first imported.
"""
import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="neo-tests-")
os.environ.update({
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": os.path.join(_TMP, "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_TMP, "prefect-results"),
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NEO_HOME": os.path.join(_TMP, "neo-home"),
})
for _var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)
