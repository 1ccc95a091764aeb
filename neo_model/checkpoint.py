"""Resumable training checkpoints: the one module that owns the on-disk format.

A checkpoint is a directory `step-00000200/` holding
  config.json + model.safetensors   the model in Hugging Face GPT-Neo format (loads in transformers),
  optimizer.safetensors              AdamW state tensors, keyed `<param index>.<name>`,
  rng.safetensors                    torch CPU (and CUDA) generator states,
  trainer_state.json                 step, data position, MLflow run id, optimizer param groups.
`trainer_state.json` is written last, and the directory is built under a temporary name and renamed,
so a crash mid-save never leaves a checkpoint that looks complete. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"


def should_save(step: int, every: int, max_steps: int) -> bool:
    """Save every `every` steps and always after the last one."""
    return step == max_steps or (every > 0 and step % every == 0)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"{idx}.{name}": (t if t.dim() else t.reshape(1)).detach().cpu().contiguous()
               for idx, state in sd["state"].items() for name, t in state.items()
               if isinstance(t, torch.Tensor)}
    return tensors, sd["param_groups"]


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write `root/step-XXXXXXXX/` atomically and prune all but the newest `keep` checkpoints."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tensors, groups = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    full_state = {**state, "step": step, "param_groups": groups,
                  "python_rng": _py_rng_to_json(random.getstate())}
    (tmp / STATE).write_text(json.dumps(full_state, indent=2, sort_keys=True))
    if final.exists():  # a re-save of the same step (e.g. after a retry) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    """Restore model weights, optimizer state and RNG states; return the trainer state."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:  # lm_head is tied to wte, absent on disk
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    if opt is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            idx, name = key.split(".", 1)
            ref = opt_state.setdefault(int(idx), {})
            ref[name] = t.reshape(()) if name == "step" else t
        opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_py_rng_from_json(state["python_rng"]))
    return state


def _py_rng_to_json(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])
