"""Throughput and host figures for the training loop's metrics lines (tasks/train/trainer.py).

`Meter` gives tokens/s since the previous log line and the ETA from the rate since this process
started (a resumed run's ETA counts only its own steps); `system_metrics` the host's CPU and memory
use and, on CUDA, the device memory in use (psutil is optional: without it, nothing).
"""
from __future__ import annotations

import time

import torch


class Meter:
    """Tokens/s between ticks and the ETA, from the step and token counters of the loop."""

    def __init__(self, step: int, tokens_seen: int):
        self.t_start = self.t_last = time.perf_counter()
        self.step_start, self.tok_last = step, tokens_seen
        self.fraction_start: float | None = None

    def tick(self, step: int, tokens_seen: int, steps_total: int | None,
             fraction: float | None = None) -> tuple[float, float | None]:
        """(tokens/s since the last tick, seconds to `steps_total` -- or to the end of the time budget,
        from the share of it used -- or None before any progress)."""
        now = time.perf_counter()
        tps = (tokens_seen - self.tok_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tok_last = now, tokens_seen
        if steps_total is None:
            if self.fraction_start is None:
                self.fraction_start = fraction
            done = (fraction or 0.0) - (self.fraction_start or 0.0)
            rate = done / max(now - self.t_start, 1e-9)
            return tps, ((1.0 - (fraction or 0.0)) / rate if rate > 0 else None)
        rate = (step - self.step_start) / max(now - self.t_start, 1e-9)
        return tps, ((steps_total - step) / rate if rate > 0 else None)


def system_metrics() -> dict[str, float]:
    try:
        import psutil
    except ImportError:
        return {}
    proc = psutil.Process()
    out = {"system/cpu_percent": psutil.cpu_percent(interval=None),
           "system/rss_mb": proc.memory_info().rss / 2**20,
           "system/memory_percent": psutil.virtual_memory().percent}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["system/gpu_memory_used_mb"] = (total - free) / 2**20
    return out
