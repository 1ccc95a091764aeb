"""Stage `train`: token rows -> GPT-Neo checkpoints and an MLflow run.

`stage.py` is the parent side (plan, launch, log streaming), `task.py` the Prefect task; the
training subprocess is `entry.py` -> `trainer.py`, with `loader.py` (token batches) and `maths.py`
(schedule, optimizer, batch arithmetic)."""
