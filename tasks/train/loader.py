"""Training data loader over the tokenize stage's packed rows: shuffled, DDP-aware, exactly resumable.

Every epoch has one global sample order, a permutation of the split's rows drawn from
`(seed, epoch)`; the loader's whole state is `(epoch, position)`, the number of samples of that order
already consumed by all ranks together. A step takes the next `batch_size * world_size` samples and
rank r gets the r-th contiguous slice of them, so

- the ranks' batches are disjoint and together cover every row exactly once per epoch (the last,
  short step of an epoch is shared as evenly as possible: ranks may get one row fewer, and a rank
  gets an empty batch when fewer rows than ranks are left; `drop_last=True` skips that step instead);
- the state does not depend on the world size: every rank reports the same state, a loader resumed
  from it yields exactly the batches the uninterrupted one would have, and a loader resumed with a
  different `world_size` continues the same epoch order from the same position, so no row is
  repeated or skipped.

Rows are decoded without copying: each Parquet chunk's binary buffer is viewed as a
[rows, seq_len + 1] uint16 array (`tasks.tokenize.rows.read_chunks`); only the rows of a batch are
gathered and widened to int64. The split is held in memory as Arrow buffers (2 bytes a token).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tasks.core.protocol import read_manifest
from tasks.tokenize.rows import read_chunks  # not tasks.tokenize.stage: that imports Prefect

STATE_VERSION = 1


# ---------------------------------------------------------------------------- token budgets


def tokens_per_step(batch_size: int, seq_len: int, world_size: int = 1) -> int:
    """Target tokens consumed by one optimizer step over all ranks."""
    return batch_size * world_size * seq_len


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int, world_size: int = 1) -> int:
    """Steps needed to train on at least `tokens` target tokens."""
    if tokens <= 0:
        raise ValueError(f"token budget must be positive, not {tokens}")
    return math.ceil(tokens / tokens_per_step(batch_size, seq_len, world_size))


def tokens_for_steps(steps: int, batch_size: int, seq_len: int, world_size: int = 1) -> int:
    """Target tokens seen in `steps` full steps."""
    return steps * tokens_per_step(batch_size, seq_len, world_size)


def training_steps(*, steps: int | None = None, tokens: int | None = None, batch_size: int,
                   seq_len: int, world_size: int = 1) -> int:
    """The training length in steps, given either as steps or as a token budget (exactly one)."""
    if (steps is None) == (tokens is None):
        raise ValueError("give the training length either in steps or in tokens, not both or neither")
    if steps is not None:
        if steps <= 0:
            raise ValueError(f"steps must be positive, not {steps}")
        return steps
    return steps_for_tokens(tokens, batch_size, seq_len, world_size)


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    step = batch_size * world_size
    return num_rows // step if drop_last else math.ceil(num_rows / step)


# ---------------------------------------------------------------------------- the loader


class TokenLoader(torch.utils.data.IterableDataset):
    """(inputs, targets) int64 batches [batch_size, seq_len] of one split for one rank.

    `iter(loader)` runs to the end of the current epoch; `loader.stream()` runs on across epochs.
    `rank` and `world_size` default to the initialized `torch.distributed` process group (else 0, 1).
    Iterate it directly (not through a multi-worker DataLoader: the state lives in this object)."""

    def __init__(self, tokens_dir: str | Path, split: str, batch_size: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 exclude_rows: np.ndarray | None = None) -> None:
        super().__init__()
        if rank is None or world_size is None:  # from the process group when there is one
            dist = torch.distributed
            live = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if live else 0) if rank is None else rank
            world_size = (dist.get_world_size() if live else 1) if world_size is None else world_size
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size > 0 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}")
        self.tokens_dir, self.split = Path(tokens_dir), split
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last = drop_last
        self.chunks, _ = read_chunks(self.tokens_dir, split)
        sizes = np.array([len(c) for c in self.chunks], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        total = int(self.starts[-1])
        # rows withheld (e.g. `tasks.tokenize.rows.rows_of_documents` for documents removed on request):
        # the order then permutes the kept rows only
        self.kept = None if exclude_rows is None else np.setdiff1d(np.arange(total), exclude_rows)
        self.num_rows = total if self.kept is None else len(self.kept)
        self.seq_len = int(read_manifest(self.tokens_dir)["seq_len"])
        if self.num_rows == 0:
            raise ValueError(f"{self.tokens_dir}: the {split} split has no rows")
        self.epoch = self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ order and slices

    @property
    def step_size(self) -> int:
        """Samples of the global order one step consumes (all ranks)."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps in a full epoch."""
        return steps_per_epoch(self.num_rows, self.batch_size, self.world_size, self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of an epoch: a permutation of the row indices."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_rows)
            self._order = (epoch, order if self.kept is None else self.kept[order])
        return self._order[1]

    def _epoch_done(self) -> bool:
        left = self.num_rows - self.position
        return left <= 0 or (self.drop_last and left < self.step_size)

    def _normalize(self) -> None:
        if self._epoch_done():
            self.epoch, self.position = self.epoch + 1, 0

    def _slice(self) -> tuple[int, int, int]:
        """(start, end) of this rank's share of the next step, and the samples the step consumes."""
        taken = min(self.step_size, self.num_rows - self.position)
        lo = self.position + (self.rank * taken) // self.world_size
        hi = self.position + ((self.rank + 1) * taken) // self.world_size
        return lo, hi, taken

    def iter_indices(self) -> Iterator[np.ndarray]:
        """This rank's row indices per step, to the end of the current epoch; advances the state."""
        self._normalize()
        epoch = self.epoch
        while self.epoch == epoch and not self._epoch_done():
            lo, hi, taken = self._slice()
            indices = self.order(epoch)[lo:hi]
            self.position += taken  # before yielding: a state saved after this batch excludes it
            yield indices
        self._normalize()

    # ------------------------------------------------------------------ batches

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given rows, int64, each [len(indices), seq_len], contiguous."""
        if len(self.chunks) == 1:
            rows = self.chunks[0][indices]
        else:
            which = np.searchsorted(self.starts, indices, side="right") - 1
            local = indices - self.starts[which]
            rows = np.empty((len(indices), self.seq_len + 1), dtype=self.chunks[0].dtype)
            for c in np.unique(which):
                mask = which == c
                rows[mask] = self.chunks[c][local[mask]]
        return (torch.from_numpy(rows[:, :-1].astype(np.int64)),
                torch.from_numpy(rows[:, 1:].astype(np.int64)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.iter_indices():
            yield self.gather(indices)

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches across epochs, without end."""
        while True:
            yield from self

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The same on every rank; save it from rank 0 with the checkpoint."""
        self._normalize()
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "split": self.split, "num_rows": self.num_rows,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (any world size and rank; same split, rows and seed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key in ("seed", "split", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has "
                                 f"{getattr(self, key)!r}: the data order would not continue")
        if not 0 <= state["position"] <= self.num_rows or state["epoch"] < 0:
            raise ValueError(f"loader state out of range: {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
