"""The training spec: everything `tasks.train.stage.run_train` hands the training loop.

Written as `train/<fp>/train_spec.json` and read back by `python -m tasks.train.entry SPEC.json` (alone
or on every rank of a `torchrun` job, on every node); `run_train` passes the object itself when it
trains in-process. Imports only the standard library and TrainConfig: the training subprocess starts
without Prefect or MLflow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.train_config import TrainConfig


@dataclass(frozen=True)
class TrainSpec:
    """One training: its config, the model's shape, where the tokens are and where the run goes."""

    train: TrainConfig
    """The train section (launch settings included: nproc, parallel, in_process)."""
    model: dict[str, Any]
    """The model's Hugging Face config dict (`GPTNeoConfig.to_hf_dict()`)."""
    tokens_dir: str
    """The tokenize stage's directory (train and val token rows)."""
    out_dir: str
    """The run directory: checkpoints/, model/ and the result file go here."""
    workspace: str | None = None
    """The pipeline workspace (recorded for whoever reads the spec; the loop does not use it)."""
    run_id: str | None = None
    """The MLflow run the metrics go to, stored in every checkpoint."""
    fingerprint: str | None = None
    """The train stage's fingerprint, stored in every checkpoint."""
    init_dir: str | None = None
    """A directory with the starting weights (config.json + safetensors); None: random init."""

    def to_json(self) -> str:
        return json.dumps({"train": self.train.model_dump(mode="json"), "model": self.model,
                           "tokens_dir": self.tokens_dir, "out_dir": self.out_dir,
                           "workspace": self.workspace, "run_id": self.run_id,
                           "fingerprint": self.fingerprint, "init_dir": self.init_dir}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        d = json.loads(text)
        return cls(train=TrainConfig.model_validate(d["train"]), model=d["model"],
                   tokens_dir=d["tokens_dir"], out_dir=d["out_dir"], workspace=d.get("workspace"),
                   run_id=d.get("run_id"), fingerprint=d.get("fingerprint"), init_dir=d.get("init_dir"))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, path: str | Path) -> TrainSpec:
        return cls.from_json(Path(path).read_text())
