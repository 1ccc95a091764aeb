"""Stage `register`: an evaluated model -> MLflow model version, aliased by the promotion gate.

`stage.py` is the logic, `task.py` the Prefect task; `registry.py` (aliases by hand and by gate),
`pyfunc_model.py` (the served model)."""
