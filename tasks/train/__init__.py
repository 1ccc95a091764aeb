"""Stage `train`: token rows -> GPT-Neo checkpoints, the final model in Hugging Face format, an MLflow run.

`stage.py` is the parent side (plan, launch, log streaming, MLflow), `task.py` the Prefect task;
`curves.py` draws the loss curve into the run. The training subprocess is `entry.py` -> `trainer.py`
(setup, train_step, maybe_validate, maybe_log, maybe_checkpoint), reading a typed `spec.py`, with
`loader.py` (token batches), `maths.py` (schedule, optimizer, batch arithmetic), `meter.py`
(throughput, system metrics) and `faults.py` (test fault injection). `export.py` writes and copies
Hugging Face model directories."""
