"""Stage `evaluate`: a trained model -> validation metrics, zero-shot task scores, samples.

`stage.py` is the Prefect-free logic, `task.py` the Prefect task; `evals/` one small module per task."""
