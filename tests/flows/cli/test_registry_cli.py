"""`neo models|promote|rollback|export-hf` as a user types them: expected failures are one `error:`
line and exit 2 (no traceback), naming what is missing; read-only verbs never create a store."""
import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from tasks.core import tracking


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace whose registry holds model `m` with version 1 (champion) and nothing else."""
    ws = tmp_path_factory.mktemp("ws")
    c = tracking.client(ws)
    run = c.create_run(tracking.experiment_id(c, "x", ws))
    c.create_registered_model("m")
    c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    c.set_registered_model_alias("m", "champion", "1")
    return ws


def _neo(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("args, message", [
    (("promote", "m", "99"), "error: model 'm' has no version 99 (versions: 1)"),
    (("promote", "NO-SUCH-MODEL", "1"), "error: model 'NO-SUCH-MODEL' is not registered here (registered: m)"),
    (("models", "NO-SUCH-MODEL"), "error: model 'NO-SUCH-MODEL' is not registered here (registered: m)"),
    (("rollback", "m"), "error: model 'm' has no 'previous-champion' version to roll back to"),
    (("export-hf", "m/7", "out"), "error: model 'm' has no version 7 (versions: 1)"),
    (("export-hf", "m@nope", "out"), "error: Registered model alias nope not found."),
])
def test_expected_registry_failures_are_one_line(ws, args, message):
    code, out = _neo(*args, "-w", str(ws))
    assert code == 2, out
    assert out.strip() == message and "Traceback" not in out


def test_read_only_verbs_never_create_a_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    typo = tmp_path / "mistyped-workspace"
    for args in (("promote", "m", "1"), ("models", "m"), ("rollback", "m")):
        code, out = _neo(*args, "-w", str(typo))
        assert code == 2 and out.startswith(f"error: no MLflow registry at {typo / 'mlflow' / 'mlflow.db'}"), out
    assert not typo.exists()


def test_promote_still_works(ws):
    code, out = _neo("promote", "m", "1", "-w", str(ws))
    assert code == 0 and out.strip() == "m: version 1 is @champion"
