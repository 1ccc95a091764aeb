"""Fixtures shared by the tasks tests."""
import pytest


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory):
    """One MLflow SQLite database for a whole test module (a fresh one costs seconds to create).

    Use it with `pytestmark = pytest.mark.usefixtures("shared_mlflow")`."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        yield f"sqlite:///{db}"
