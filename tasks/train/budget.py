"""The training length of the loop in tasks/train/trainer.py: a step count, or a time budget.

A budgeted run (`train.max_time` wall seconds, `train.max_cpu_time` CPU seconds) ends when the budget is
used; the time is summed over restarts (checkpoints save it), and every rank agrees on the share used
(the largest), so all ranks stop after the same step.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from tasks.train.maths import budget_fraction


class Clock:
    """Adds the wall and CPU time since the previous call to the state, then decides (alike on every
    rank) what share of a time budget is used and whether the run is done."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def advance(self, run: Any, state: Any) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        state.wall_s += wall - self.wall
        state.cpu_s += cpu - self.cpu
        self.wall, self.cpu = wall, cpu
        update_progress(run, state)


def update_progress(run: Any, state: Any) -> None:
    """`state.fraction` and `state.done` from the counters (a budget's share: the largest over ranks)."""
    if run.steps_total is not None:
        state.done = state.step >= run.steps_total
        return
    share = torch.tensor([budget_fraction(run.cfg, state.wall_s, state.cpu_s)], dtype=torch.float64)
    if run.world > 1:
        share = share.to(run.device)
        dist.all_reduce(share, op=dist.ReduceOp.MAX)
    state.fraction = float(share[0])
    state.done = state.fraction >= 1.0


def length(run: Any) -> str:
    """How long the run is, in words: its steps or its time budget."""
    if run.steps_total is not None:
        return f"{run.steps_total} steps"
    budgets = [f"{b:g} s of {kind} time" for b, kind in ((run.cfg.max_time, "wall"),
                                                         (run.cfg.max_cpu_time, "CPU")) if b]
    return " or ".join(budgets) + " (whichever ends first)" * (len(budgets) > 1)
