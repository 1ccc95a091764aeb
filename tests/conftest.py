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
    "NEO_CACHE_DIR": os.path.join(_TMP, "neo-cache"),  # never the user's ~/.cache
    # as the CLI sets it (flows/cli/runtime.py): Prefect's 20 s default is too short for the first
    # server start (a new database's migrations) on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
})
for _var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)


import pytest  # noqa: E402 - after the environment above

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
"""The PostgreSQL the machines provide (trust auth); tests create and drop their own databases on it."""


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """`PG_SERVER` when it answers; otherwise skip with the reason, or fail under CI=true."""
    from flows.cli.databases import postgres_reachable

    if not postgres_reachable(f"{PG_SERVER}/postgres"):
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL at 127.0.0.1:5432 (user postgres) is required under CI=true")
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (user postgres)")
    return PG_SERVER
