"""How the training step runs on its device: `train.compile` (torch.compile or eager) and
`train.precision` (bf16 autocast or fp32), resolved once in `trainer.setup`.

Imports only torch, like maths.py. The `auto` rules are documented on the TrainConfig fields and
come from benchmarks/bench_model.py --compile (benchmarks/RESULTS.md, "Model"): on CPU the compiled
step was no faster than the eager one (the fused head + loss had taken the part inductor used to
fuse), so compiling there only costs its ~80-100 s.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch


def use_compile(cfg: Any, device: torch.device) -> bool:
    """train.compile resolved: true/false as given; auto = on CUDA only."""
    if cfg.compile != "auto":
        return bool(cfg.compile)
    return device.type == "cuda"


def use_bf16(cfg: Any, device: torch.device) -> bool:
    """train.precision resolved: bf16 / fp32 as given; auto = bf16 on CUDA, fp32 on CPU."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: bool) -> Any:
    """The context the forward passes run in: bf16 autocast on the device's type, or nothing (fp32).
    Re-entered every micro-batch (a torch.autocast object can be)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def step_mode(model: Any, cfg: Any, device: torch.device, bf16: bool) -> tuple[Any, Any, str]:
    """(the steps' forward: model or torch.compile(model), the autocast context, a few words for the log)."""
    compiled = use_compile(cfg, device)
    fwd = torch.compile(model) if compiled else model
    return fwd, autocast(device, bf16), ("bf16 autocast" if bf16 else "fp32") + (", compiled" if compiled else "")
