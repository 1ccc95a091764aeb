"""The pre-training loop: one process or one rank of a `torchrun` job (DDP or FSDP2), exactly resumable.

`train_loop(spec)` runs a `tasks.train.spec.TrainSpec` (from `python -m tasks.train.entry SPEC.json`,
or in-process from `tasks.train.stage` when `train.in_process` is set). Rank 0 writes checkpoints and
the final model and prints `NEO_METRICS {json}` lines (the parent logs them to the MLflow run, so this
process never imports MLflow) and `NEO_PROGRESS {json}` lines for the Prefect task's progress artifact.
Read top to bottom: `train_loop`, the outline; `setup` (-> `Run`, `State`); `train_step`; the
`maybe_validate` / `maybe_log` / `maybe_checkpoint` after each step; `finish`.

Batches: `batch_size` rows (or `batch_tokens`) per optimizer step over all ranks; each rank takes its
contiguous share of the loader's global order (world-size independent, so a run resumes on any number
of processes) in `micro_batch_size` micro-batches (gradient accumulation). `train.parallel: fsdp` shards
the model with FSDP2 per transformer block and the root (`neo_model.parallel`; bf16 compute on CUDA,
fp32 master weights and reduction). Checkpoints and the final model hold the consolidated state either
way (gathered to rank 0), so a run saved under FSDP resumes under DDP or in one process and vice versa.

Test hooks come from tasks/train/faults.py, metrics from meter.py, the run's length from budget.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from neo_model import GPTNeo, GPTNeoConfig
from neo_model.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint, should_save,
                                  training_state)
from neo_model.hf_io import write_pretrained
from neo_model.parallel import full_tensor, shard
from tasks.core.cpus import set_torch_threads
from tasks.core.train_config import TrainConfig
from tasks.train.accel import step_mode, use_bf16
from tasks.train.faults import Faults
from tasks.train.loader import TokenLoader
from tasks.train.budget import Clock, length, update_progress
from tasks.train.meter import Meter, system_metrics
from tasks.train.maths import batch_shape, lr_at, make_optimizer, peak_flops, peak_memory_mb, step_loss, total_steps
from tasks.train.spec import TrainSpec

PROGRESS, METRICS, ERROR = "NEO_PROGRESS ", "NEO_METRICS ", "NEO_ERROR "  # line prefixes the parent reads
RESULT = "train_result.json"


def train_loop(spec: TrainSpec, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Train to the spec's end (resuming from the newest checkpoint); return the result (rank 0)."""
    run, state = setup(spec, emit)
    faults = Faults.from_env()
    stream = run.loader.stream()
    run.model.train()
    meter = Meter(state.step, state.tokens_seen)
    clock = Clock()
    while not state.done:
        faults.before_step(state.step, run.resumed)
        train_step(run, state, stream, faults)
        clock.advance(run, state)
        val_now = maybe_validate(run, state)
        maybe_log(run, state, meter, val_now)
        maybe_checkpoint(run, state, val_now)
    return finish(run, state)


# ---------------------------------------------------------------------------- setup


@dataclass
class Run:
    """What `setup` builds once per process; the loop uses it but never reassigns its fields."""

    spec: TrainSpec
    out: Path  # spec.out_dir
    ckpt_root: Path  # out / "checkpoints"
    cfg: TrainConfig
    sched: TrainConfig  # cfg with max_steps = the real step count (a token budget sets it): the lr schedule
    rank: int
    world: int
    device: torch.device
    say: Callable[[str], None]  # emit on rank 0, silent elsewhere
    loader: TokenLoader
    val_loader: TokenLoader | None
    per_rank: int  # rows per step on this rank
    accum: int  # micro-batches per step
    steps_total: int | None  # None: a time budget (train.max_time / max_cpu_time) ends the run
    tokens_per_step: int
    mcfg: GPTNeoConfig
    net: GPTNeo  # the module itself (FSDP-sharded in place): clipping, validation, checkpoints
    model: Any  # net, or its DDP wrapper: train(), no_sync()
    fwd: Callable  # model, compiled when train.compile resolves to true: the steps' forward
    opt: torch.optim.Optimizer
    autocast: Any
    sharded: bool
    resumed: bool
    n_params: int
    fpt: float  # FLOPs per token
    peak: float | None  # peak FLOP/s of one device, for MFU


@dataclass
class State:
    """The counters the loop advances (a checkpoint saves step, tokens_seen and skipped)."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run
    consecutive: int = 0  # ... in a row, up to the last step
    last_good: int = 0  # the step of the newest checkpoint (named in the error when NaNs stop the run)
    lr: float = float("nan")
    loss: float = float("nan")
    grad_norm: float = float("nan")
    val_loss: float | None = None
    best_val: float | None = None
    wall_s: float = 0.0  # training-loop time used, summed over restarts (saved in checkpoints)
    cpu_s: float = 0.0  # CPU time of the training process over the same span (the busiest rank's)
    fraction: float | None = None  # share of the time budget used; None for a step-based run
    done: bool = False  # the run reached its end (last step or budget): validate, log and save now


def setup(spec: TrainSpec, emit: Callable[[str], None]) -> tuple[Run, State]:
    """Join the process group, open the loaders, build the model and optimizer, resume from the newest
    checkpoint (or load `init_dir`), and say what is about to be trained."""
    cfg = spec.train
    rank, world, device = setup_distributed(cfg)
    say = emit if rank == 0 else (lambda m: None)  # one rank speaks for the job
    threads = set_torch_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", world)))  # share the CPUs

    loader = TokenLoader(spec.tokens_dir, "train", batch_size=1, seed=cfg.seed, rank=rank, world_size=world,
                         drop_last=True)
    seq_len = loader.seq_len
    rows_per_step, per_rank, accum = batch_shape(cfg, seq_len, world)
    loader.batch_size = per_rank
    if loader.num_rows < rows_per_step:
        raise ValueError(f"the train split has {loader.num_rows} rows, fewer than one batch of "
                         f"{rows_per_step}")
    steps_total = total_steps(cfg, rows_per_step, seq_len)

    net, mcfg, ckpt = build_model(spec, device)
    n_params, fpt = net.num_parameters(), net.flops_per_token(seq_len)
    sharded = world > 1 and cfg.parallel == "fsdp"
    bf16 = use_bf16(cfg, device)
    if sharded:
        shard(net, world, device, bf16=bf16 and device.type == "cuda")
    opt = make_optimizer(net, cfg, device)
    state = State()
    if ckpt is not None:
        resume(ckpt, net, opt, loader, state, rank, world, say)
    state.last_good = state.step

    model: Any = net
    if world > 1 and not sharded:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    fwd, autocast, how = step_mode(model, cfg, device, bf16)  # train.compile, train.precision
    val_loader = None
    if cfg.val_every:
        val_loader = TokenLoader(spec.tokens_dir, "val", batch_size=per_rank // accum, seed=cfg.seed,
                                 rank=rank, world_size=world)
    run = Run(spec=spec, out=Path(spec.out_dir), ckpt_root=Path(spec.out_dir) / "checkpoints", cfg=cfg,
              sched=cfg.model_copy(update={"max_steps": steps_total or cfg.max_steps}), rank=rank, world=world,
              device=device, say=say, loader=loader, val_loader=val_loader, per_rank=per_rank, accum=accum,
              steps_total=steps_total, tokens_per_step=rows_per_step * seq_len, mcfg=mcfg, net=net,
              model=model, fwd=fwd, opt=opt, autocast=autocast, sharded=sharded, resumed=ckpt is not None,
              n_params=n_params, fpt=fpt, peak=peak_flops(cfg, device))
    update_progress(run, state)
    mode = ("FSDP" if sharded else "DDP") if world > 1 else "single process"
    say(f"training {n_params:,} parameters on {world} x {device.type} ({mode}, {threads} CPU thread(s) per "
        f"process) in {how}: {length(run)}, steps of {rows_per_step} rows ({run.tokens_per_step:,} tokens, {accum} micro-batch(es) per process)")
    return run, state


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment (a single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def build_model(spec: TrainSpec, device: torch.device) -> tuple[GPTNeo, GPTNeoConfig, Path | None]:
    """(model on `device`, its config, the newest checkpoint or None). Built from the seed, then given
    `init_dir`'s weights in a run without a checkpoint (a checkpoint's are loaded in `resume`)."""
    torch.manual_seed(spec.train.seed)
    mcfg = GPTNeoConfig.from_hf_dict(spec.model)
    net = GPTNeo(mcfg)
    ckpt = latest_checkpoint(Path(spec.out_dir) / "checkpoints")
    if ckpt is None and spec.init_dir:
        src = GPTNeo.from_pretrained(spec.init_dir)
        net.load_state_dict(src.state_dict())
        del src
    net.to(device)
    return net, mcfg, ckpt


def resume(ckpt: Path, net: GPTNeo, opt: torch.optim.Optimizer, loader: TokenLoader, state: State,
           rank: int, world: int, say: Callable[[str], None]) -> None:
    """The checkpoint's weights, optimizer, counters and data position (saved on any number of processes)."""
    saved = load_checkpoint(ckpt, net, opt, rank=rank)
    state.step, state.tokens_seen = saved["step"], saved["tokens_seen"]
    state.skipped = saved.get("skipped_steps", 0)
    state.wall_s, state.cpu_s = saved.get("wall_s", 0.0), saved.get("cpu_s", 0.0)
    loader.load_state_dict(saved["loader"])
    say(f"resuming from {ckpt} (step {state.step}, MLflow run {saved['run_id']}, "
        f"saved on {saved.get('world_size', 1)} process(es), now {world})")


# ---------------------------------------------------------------------------- one optimizer step


def train_step(run: Run, state: State, stream: Iterator[tuple[torch.Tensor, torch.Tensor]],
               faults: Faults) -> None:
    """One optimizer step on the next global batch: reseed, set the lr, accumulate the gradients,
    clip, then step, or skip the step when any rank's loss or gradient is not finite."""
    # dropout depends on (seed, step, rank) only, not on how often the run was restarted
    torch.manual_seed(run.cfg.seed * 1_000_003 + state.step * 1_009 + run.rank)
    state.lr = lr_at(state.step, run.sched, state.fraction)
    for group in run.opt.param_groups:
        group["lr"] = state.lr
    x_all, y_all = next(stream)
    step_ce = accumulate_gradients(run, x_all, y_all, state.step, faults)
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.net.parameters(), run.cfg.grad_clip))
    bad = (~torch.isfinite(step_ce) | ~torch.isfinite(grad_norm)).float()
    both = _all_sum(torch.stack([step_ce.float(), bad]), run.world)
    state.loss, is_bad = float(both[0]) / run.world, bool(both[1] > 0)  # every rank decides the same
    state.grad_norm = float(grad_norm)
    if is_bad:
        skip_step(run, state)
    else:
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        state.consecutive = 0
    state.step += 1
    state.tokens_seen += run.tokens_per_step


def accumulate_gradients(run: Run, x_all: torch.Tensor, y_all: torch.Tensor, step: int,
                         faults: Faults) -> torch.Tensor:
    """Forward + backward of this rank's micro-batches, each objective divided by their number so the
    gradient is the step's mean; returns this rank's mean cross-entropy over the step."""
    step_ce = torch.zeros((), device=run.device)
    micro = run.per_rank // run.accum
    for i, (x, y) in enumerate(zip(x_all.split(micro), y_all.split(micro))):
        sync = contextlib.nullcontext()
        if run.sharded:
            run.net.set_requires_gradient_sync(i == run.accum - 1)  # reduce-scatter once per step
        elif run.world > 1 and i < run.accum - 1:
            sync = run.model.no_sync()  # DDP: all-reduce only with the last micro-batch's backward
        with sync:
            with run.autocast:
                ce, objective = step_loss(run.fwd, x.to(run.device, non_blocking=True),
                                          y.to(run.device, non_blocking=True), run.cfg.z_loss)
            ce, objective = faults.poison(step, ce, objective)
            (objective / run.accum).backward()
        step_ce += ce.detach() / run.accum
    return step_ce


def skip_step(run: Run, state: State) -> None:
    """Drop the step's gradients; stop the run after `nan_tolerance` skipped steps in a row."""
    run.opt.zero_grad(set_to_none=True)
    state.skipped += 1
    state.consecutive += 1
    run.say(f"step {state.step + 1}: non-finite loss or gradient (loss {state.loss}, grad norm "
            f"{state.grad_norm}); skipped ({state.consecutive} in a row, {state.skipped} in all)")
    if state.consecutive >= run.cfg.nan_tolerance:
        raise FloatingPointError(
            f"non-finite loss or gradient at {state.consecutive} consecutive steps (the last at step "
            f"{state.step + 1}, loss {state.loss}); the run stops. The last good checkpoint (step "
            f"{state.last_good}) is kept in {run.ckpt_root} and a rerun resumes from it")


# ---------------------------------------------------------------------------- after a step


def maybe_validate(run: Run, state: State) -> bool:
    """Every `val_every` steps and at the end, the mean loss over the first `val_batches` micro-batches
    of the val order (all ranks); True when it ran. A sharded model's forward is a collective: a rank
    left without rows runs one on a dummy row, unscored."""
    every = run.cfg.val_every
    if not (every and (state.step % every == 0 or state.done)):
        return False
    net, loader, device = run.net, run.val_loader, run.device
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "position": 0})
    net.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i >= run.cfg.val_batches:
                break
            if not len(x) and run.sharded:
                with run.autocast:
                    net(torch.zeros(1, loader.seq_len, dtype=torch.long, device=device))
            if len(x):
                with run.autocast:
                    _, loss = net(x.to(device), targets=y.to(device))
                acc += torch.tensor([loss.double().item() * y.numel(), y.numel()], dtype=torch.float64,
                                    device=device)
    net.train()  # the loop trains in train mode throughout
    acc = _all_sum(acc, run.world)
    state.val_loss = float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")
    state.best_val = state.val_loss if state.best_val is None else min(state.best_val, state.val_loss)
    return True


def maybe_log(run: Run, state: State, meter: Meter, val_now: bool) -> None:
    """Rank 0, every `log_every` steps and at the end: metrics (for MLflow), a line, progress (Prefect)."""
    step = state.step
    if run.rank != 0 or not (step % run.cfg.log_every == 0 or state.done):
        return
    tps, eta = meter.tick(step, state.tokens_seen, run.steps_total, state.fraction)
    metrics = {"train_loss": state.loss, "lr": state.lr, "grad_norm": state.grad_norm, "tokens_per_s": tps,
               "flops_per_s": tps * run.fpt, "peak_memory_mb": peak_memory_mb(run.device),
               "skipped_steps": state.skipped, "tokens_seen": state.tokens_seen, "train_wall_s": state.wall_s,
               "train_cpu_s": state.cpu_s, **system_metrics()}
    if run.peak:
        metrics["mfu"] = tps * run.fpt / (run.peak * run.world)
    if val_now:
        metrics["val_loss"] = state.val_loss
    if state.fraction is not None:
        metrics["budget_fraction"] = state.fraction
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}  # a skipped step's NaN loss: left out
    run.say(METRICS + json.dumps({"step": step, "metrics": metrics}))
    where = f"/{run.steps_total}" if state.fraction is None else f" ({state.fraction:.0%} of budget)"
    run.say(f"step {step}{where} loss {state.loss:.4f} lr {state.lr:.2e} {tps:,.0f} tok/s"
            + (f" val {state.val_loss:.4f}" if val_now else ""))
    run.say(PROGRESS + json.dumps({"step": step, "max_steps": run.steps_total, "fraction": state.fraction,
                                   "loss": state.loss, "tokens_per_s": tps, "eta_s": eta,
                                   "val_loss": state.val_loss}))


def maybe_checkpoint(run: Run, state: State, val_now: bool) -> None:
    """Every `checkpoint_every` steps and at the end, the consolidated weights and optimizer (gathered
    from the shards on every rank, written by rank 0) with the counters and the loader's position."""
    step = state.step
    # no checkpoint inside a streak of skipped steps: the last good one stays the newest
    if not ((state.done or should_save(step, run.cfg.checkpoint_every, -1))
            and (state.consecutive == 0 or state.done)):
        return
    weights, optim = training_state(run.net, run.opt) if run.sharded or run.rank == 0 else ({}, {})
    if run.rank == 0:
        saved = {"tokens_seen": state.tokens_seen, "run_id": run.spec.run_id,
                 "train_fingerprint": run.spec.fingerprint, "loader": run.loader.state_dict(),
                 "skipped_steps": state.skipped, "world_size": run.world, "wall_s": state.wall_s,
                 "cpu_s": state.cpu_s}
        if val_now:
            saved["val_loss"] = state.val_loss
        save_checkpoint(run.ckpt_root, step, run.mcfg, weights, optim, saved, keep=run.cfg.keep_last)
    del weights, optim  # the gathered copy of a large model: free it before waiting for the others
    _barrier(run.world)
    state.last_good = step


# ---------------------------------------------------------------------------- the end


def finish(run: Run, state: State) -> dict[str, Any]:
    """Write the final model (Hugging Face format) and the result file (rank 0); leave the group."""
    result = {"steps": state.step, "tokens_seen": state.tokens_seen, "final_loss": state.loss,
              "skipped_steps": state.skipped, "num_parameters": run.n_params, "device": run.device.type,
              "world_size": run.world, "val_loss": state.val_loss, "best_val_loss": state.best_val,
              "flops_per_token": run.fpt, "train_wall_s": state.wall_s, "train_cpu_s": state.cpu_s,
              "budget_fraction": state.fraction}
    weights = training_state(run.net, None)[0] if run.sharded or run.rank == 0 else {}
    if run.rank == 0:
        model_dir = run.out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        write_pretrained(run.mcfg, weights, model_dir)
        (run.out / RESULT).write_text(json.dumps(result, indent=2))
    _barrier(run.world)
    if run.world > 1:
        dist.destroy_process_group()
    return result

