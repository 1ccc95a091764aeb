"""The training loop's pure pieces: lr schedule, AdamW groups, batch arithmetic, loss, FLOP peaks.

Imports only torch (no pydantic, Prefect or MLflow), so benchmarks/bench_gpu_train.py runs them on a
machine with just torch installed; `cfg` is a `tasks.core.train_config.TrainConfig` or any object with the same
attributes.
"""
from __future__ import annotations

import math
import resource
from typing import Any, Callable

import torch

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
              "L4": 121e12, "4090": 165e12}


def lr_at(step: int, cfg: Any, fraction: float | None = None) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak (EleutherAI's schedule).

    Step-based runs decay over `max_steps`; a budgeted run (`fraction` = share of the time budget
    used) decays by that fraction instead, scaled by the warmup ramp of its first `warmup_steps`."""
    floor = cfg.lr * cfg.min_lr_ratio
    if fraction is not None:
        ramp = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        progress = min(1.0, max(0.0, fraction))
        return ramp * (floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def budget_fraction(cfg: Any, wall_s: float, cpu_s: float) -> float | None:
    """Share of the time budget used (the larger of wall and CPU when both are set); None: no budget."""
    shares = [used / budget for used, budget in ((wall_s, cfg.max_time), (cpu_s, cfg.max_cpu_time)) if budget]
    return max(shares) if shares else None


def make_optimizer(model: torch.nn.Module, cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not biases, LayerNorms); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def batch_shape(cfg: Any, seq_len: int, world: int) -> tuple[int, int, int]:
    """(rows per optimizer step over all ranks, rows per rank, micro-batches per step)."""
    rows = math.ceil(cfg.batch_tokens / seq_len) if cfg.batch_tokens else cfg.batch_size
    if rows % world:
        raise ValueError(f"the batch of {rows} rows does not split over {world} processes")
    per_rank = rows // world
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise ValueError(f"{per_rank} rows per process is not a multiple of micro_batch_size {micro}")
    return rows, per_rank, per_rank // micro


def total_steps(cfg: Any, rows_per_step: int, seq_len: int) -> int | None:
    """Steps the run takes (None for a time budget: it ends when the budget is used)."""
    if cfg.max_time or cfg.max_cpu_time:
        return None
    return math.ceil(cfg.max_tokens / (rows_per_step * seq_len)) if cfg.max_tokens else cfg.max_steps


def step_loss(model: Callable, x: torch.Tensor, y: torch.Tensor, z_loss: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, objective): the objective adds z_loss * mean(logsumexp(logits)^2). Without
    z-loss the logits are not needed, so the model's fused head + loss runs (neo_model.fused)."""
    logits, loss = model(x, targets=y, return_logits=bool(z_loss))
    if not z_loss:
        return loss, loss
    z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    return loss, loss + z_loss * z


def peak_flops(cfg: Any, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
