"""Resumable training checkpoints: the one module that owns the on-disk format.

A checkpoint is a directory `step-00000200/` holding
  config.json + model.safetensors   the model in Hugging Face GPT-Neo format (loads in transformers),
  optimizer.safetensors              AdamW state tensors, keyed `<param index>.<name>`,
  rng.safetensors                    torch CPU (and CUDA) generator states, numpy's MT19937 keys,
  trainer_state.json                 step, loader state, MLflow run id, optimizer param groups (the
                                     scheduler is a pure function of the step), python/numpy RNG.
`trainer_state.json` is written last, and the directory is built under a temporary name and renamed,
so a crash mid-save never leaves a checkpoint that looks complete. Nothing is ever unpickled.

The state is always the full (consolidated) one a single process holds: an FSDP-sharded model's
weights and optimizer state are gathered to rank 0 for saving and broadcast from it on loading
(`neo_model.parallel`), so a checkpoint resumes on one process, under DDP or FSDP, on any number of
processes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import GPTNeoConfig
from .hf_io import read_weights, write_pretrained

STATE = "trainer_state.json"


def should_save(step: int, every: int, max_steps: int) -> bool:
    """Save every `every` steps and always after the last one."""
    return step == max_steps or (every > 0 and step % every == 0)


def training_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, optimizer state dict keyed by parameter index; {} without `opt`) to pass to
    save_checkpoint. For an FSDP-sharded model this gathers the full state to rank 0 (a collective:
    every rank calls it; the other ranks get empty dicts)."""
    from .parallel import gather_full_state, is_sharded

    if is_sharded(model):
        return gather_full_state(model, opt)
    return model.state_dict(), opt.state_dict() if opt is not None else {}


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {f"{idx}.{name}": (t if t.dim() else t.reshape(1)).detach().cpu().contiguous()
               for idx, state in sd["state"].items() for name, t in state.items()
               if isinstance(t, torch.Tensor)}
    return tensors, sd["param_groups"]


def save_checkpoint(root: Path, step: int, config: GPTNeoConfig, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any], keep: int = 2) -> Path:
    """Write `root/step-XXXXXXXX/` atomically (on rank 0, from `training_state`'s output) and prune
    all but the newest `keep` checkpoints and the one with the lowest `val_loss` in its state (when any
    has one)."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_pretrained(config, model_state, tmp)
    tensors, groups = _optimizer_tensors(optim_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    np_state = np.random.get_state()
    rng = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    full_state = {**state, "step": step, "param_groups": groups,
                  "python_rng": _py_rng_to_json(random.getstate()),
                  "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    (tmp / STATE).write_text(json.dumps(full_state, indent=2, sort_keys=True))
    if final.exists():  # a re-save of the same step (e.g. after a retry) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    best = best_checkpoint(root)
    for old in list_checkpoints(root)[:-keep]:
        if old != best:
            shutil.rmtree(old)
    return final


def best_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the lowest validation loss (None when none recorded one)."""
    scored = []
    for path in list_checkpoints(root):
        v = read_state(path).get("val_loss")
        if v is not None and v == v:
            scored.append((float(v), path))
    return min(scored)[1] if scored else None


def read_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json."""
    return json.loads((Path(path) / STATE).read_text())


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Model weights only (init_from an earlier run's checkpoint: optimizer and RNG start fresh)."""
    missing, unexpected = model.load_state_dict(read_weights(path), strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:  # lm_head is tied to wte, absent on disk
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _read_optimizer(path: Path, state: dict) -> dict[str, Any]:
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = t.reshape(()) if name == "step" else t
    return {"state": opt_state, "param_groups": state["param_groups"]}


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    rank: int = 0) -> dict:
    """Restore model weights, optimizer state and RNG states; return the trainer state. For an
    FSDP-sharded model every rank calls it (rank 0 reads the tensors and broadcasts them)."""
    from .parallel import is_sharded, scatter_full_state

    path = Path(path)
    state = read_state(path)
    if is_sharded(model):
        weights, optim = {}, {}  # rank 0 reads and broadcasts; every rank takes part
        if rank == 0:
            weights = read_weights(path)
            weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied: the same parameter
            optim = _read_optimizer(path, state) if opt is not None else {}
        scatter_full_state(model, opt, weights, optim, rank)
    else:
        load_weights(path, model)
        if opt is not None:
            opt.load_state_dict(_read_optimizer(path, state))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_py_rng_from_json(state["python_rng"]))
    if "numpy_keys" in rng and "numpy_rng" in state:
        kind, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((kind, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    return state


def _py_rng_to_json(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])
