"""FSDP2 for GPTNeo: shard per transformer block plus the root, and move full (consolidated) model and
optimizer state in and out of a sharded model.

`shard(model, mesh, bf16)` applies `torch.distributed.fsdp.fully_shard` to every `Block` and then to
the root (embeddings, final LayerNorm, the tied head), in place; parameter names do not change. With
`bf16` (CUDA) parameters are all-gathered and computed in bf16 while gradients are reduced and the
optimizer steps in fp32.

The full state is what a single process holds: `model.state_dict()` (the tied `lm_head.weight`
included; the checkpoint writer drops it) and an optimizer state dict keyed by parameter index, as
`torch.optim.Optimizer.state_dict()` numbers parameters (in param-group order). Index order comes from
the optimizer's param groups, which FSDP2 leaves as they are, so one checkpoint serves one process,
DDP and FSDP alike, on any number of processes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard(model: torch.nn.Module, world: int, device: torch.device, bf16: bool) -> torch.nn.Module:
    """FSDP2-shard `model` (a GPTNeo) over `world` processes of the initialized process group."""
    mesh: DeviceMesh = init_device_mesh(device.type, (world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _index_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (a tied parameter under its first name)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


def gather_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, index-keyed optimizer state; {} without `opt`) of a sharded model, on CPU, on
    rank 0; empty dicts on the other ranks. A collective: every rank calls it."""
    model_sd = get_model_state_dict(model, options=GATHER)
    if opt is None:
        return model_sd, {}
    optim_sd = get_optimizer_state_dict(model, opt, options=GATHER)
    if not model_sd:
        return {}, {}
    index = {name: i for i, name in enumerate(_index_names(model, opt))}
    state = {index[name]: s for name, s in optim_sd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    return model_sd, {"state": state, "param_groups": groups}


def scatter_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                       model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any], rank: int) -> None:
    """Load a full state (read on rank 0 only; the others pass empty dicts) into a sharded model and
    its optimizer: rank 0 broadcasts each tensor and every rank keeps its shard. A collective."""
    set_model_state_dict(model, model_sd if rank == 0 else {}, options=SCATTER)
    if opt is None:
        return
    if rank == 0:
        names = _index_names(model, opt)
        optim_sd = {"state": {names[int(i)]: s for i, s in optim_sd["state"].items()},
                    "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                     for g in optim_sd["param_groups"]]}
    set_optimizer_state_dict(model, opt, optim_sd if rank == 0 else {}, options=SCATTER)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor such as a sharded model's clipped gradient norm."""
    return t.full_tensor() if isinstance(t, DTensor) else t
