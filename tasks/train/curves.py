"""The run's loss curve as an MLflow image artifact (parent side: the training subprocess only prints
metrics, `tasks.train.stage` logs them and draws the curve when the training ends).

matplotlib loads only when a curve is drawn, and the MLflow client comes from the caller, so importing
this module loads neither.
"""
from __future__ import annotations

from typing import Any


def log_loss_curve(client: Any, run_id: str) -> None:
    """The whole run's train (and val) loss history, restarts included, as an image artifact."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if hist:
            ax.plot(*zip(*hist), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    client.log_figure(run_id, fig, "loss_curve.png")
    plt.close(fig)
