"""Fault injection for the training loop's tests, read once from the environment.

`NEO_TRAIN_TEST_KILL_AT_STEP=k` SIGKILLs the process before step k and `NEO_TRAIN_TEST_FAIL_AT_STEP=k`
raises there, both only in a run that did not resume from a checkpoint (so the rerun that a test
starts after the crash gets through); `NEO_TRAIN_TEST_NAN_STEPS=4,5` makes those steps' loss NaN in
any run. With none of them set, `Faults.from_env()` does nothing.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Mapping

import torch

KILL_AT, FAIL_AT, NAN_AT = "NEO_TRAIN_TEST_KILL_AT_STEP", "NEO_TRAIN_TEST_FAIL_AT_STEP", "NEO_TRAIN_TEST_NAN_STEPS"


def _step(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    return int(value) if value else None


@dataclass(frozen=True)
class Faults:
    """The injected faults of one run: a kill, a failure and the steps whose loss is NaN."""

    kill_at: int | None = None
    fail_at: int | None = None
    nan_steps: frozenset[int] = frozenset()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        return cls(kill_at=_step(environ, KILL_AT), fail_at=_step(environ, FAIL_AT),
                   nan_steps=frozenset(int(s) for s in environ.get(NAN_AT, "").split(",") if s.strip()))

    def before_step(self, step: int, resumed: bool) -> None:
        """Kill or fail before `step` when asked to, unless the run resumed from a checkpoint."""
        if resumed:
            return
        if self.kill_at == step:
            sys.stdout.flush()  # the lines printed so far reach the parent; SIGKILL flushes nothing
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_at == step:
            raise RuntimeError(f"test hook: injected failure before step {step}")

    def poison(self, step: int, ce: torch.Tensor, objective: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ce, objective), both NaN at a poisoned step; the NaN flows through backward into the
        gradients, as a real overflow would."""
        if step not in self.nan_steps:
            return ce, objective
        return ce * float("nan"), objective * float("nan")
