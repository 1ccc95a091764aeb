"""The layout keeps its promises: each stage's logic imports without Prefect or MLflow (a notebook, a
Dask worker or the training subprocess loads it fast), each stage's one Prefect task sits in its
`task.py`, `flows/` holds flows only, and no module outgrows 400 lines."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("download", "clean", "dedup", "tokenize", "train", "evaluate", "register")
NEEDS_MLFLOW = {"tasks.register.pyfunc_model"}
"""The served model is an `mlflow.pyfunc.PythonModel` subclass: MLflow is what it is for."""


def logic_modules(stage: str) -> list[str]:
    pkg = ROOT / "tasks" / stage
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in pkg.rglob("*.py") if p.name != "task.py")


def test_every_stage_is_a_package_with_a_task_module():
    for stage in STAGES:
        assert (ROOT / "tasks" / stage / "stage.py").is_file(), stage
        assert (ROOT / "tasks" / stage / "task.py").is_file(), stage
    flat = sorted(p.name for p in (ROOT / "tasks").glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"modules outside a stage package or tasks/core: {flat}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_logic_imports_no_prefect_or_mlflow(stage):
    modules = [m for m in logic_modules(stage) if m not in NEEDS_MLFLOW]
    assert f"tasks.{stage}.stage" in modules
    code = (f"import importlib, json, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert not loaded & {"prefect", "mlflow"}, f"{stage}: importing {modules} loads {loaded & {'prefect', 'mlflow'}}"


def test_each_task_module_holds_its_stages_prefect_task():
    from prefect import Task

    for stage in STAGES:
        module = __import__(f"tasks.{stage}.task", fromlist=[stage])
        task = getattr(module, stage)
        assert isinstance(task, Task) and task.name == stage


def test_flows_package_holds_flows_only():
    from prefect import Flow

    for path in sorted((ROOT / "flows").glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = __import__(f"flows.{path.stem}", fromlist=["_"])
        flows = [v for v in vars(module).values() if isinstance(v, Flow) and v.fn.__module__ == module.__name__]
        assert flows, f"flows/{path.name} defines no flow"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for top in ("tasks", "flows") for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
