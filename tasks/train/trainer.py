"""The pre-training loop: one process or one rank of a `torchrun` job (DDP or FSDP2), exactly resumable.

`train_loop(spec)` is what `python -m tasks.train.entry SPEC.json` runs (and what `tasks.train.stage` calls
in-process when `train.in_process` is set). The spec is plain JSON written by `tasks.train.stage.run_train`:
the TrainConfig, the model's HF config, the tokens and run directories, the MLflow run id and where
the weights start. Rank 0 writes checkpoints and the final model and prints `NEO_METRICS {json}` lines
(the parent logs them to the MLflow run, so this process never imports MLflow) and `NEO_PROGRESS
{json}` lines that the Prefect task turns into a progress artifact.

Batches: `batch_size` rows (or `batch_tokens`) per optimizer step over all ranks; each rank takes its
contiguous share of the loader's global order and splits it into `micro_batch_size` micro-batches
(gradient accumulation), each loss scaled so the gradient is the mean over the whole step. The loader
state is world-size independent, so a run resumes on any number of processes. Every step reseeds torch
from (seed, step, rank), so dropout does not depend on how often the run was restarted.

`train.parallel: fsdp` (with several processes) shards the model with FSDP2 per transformer block and
the root (`neo_model.parallel`; bf16 parameters in compute on CUDA, fp32 master weights and gradient
reduction). Checkpoints and the final model hold the consolidated state either way (gathered to rank 0),
so a run saved under FSDP resumes under DDP or in one process, and the other way round.

Test hooks (environment, only in a run that did not resume from a checkpoint):
`NEO_TRAIN_TEST_KILL_AT_STEP=k` SIGKILLs the process before step k, `NEO_TRAIN_TEST_FAIL_AT_STEP=k`
raises there; `NEO_TRAIN_TEST_NAN_STEPS=4,5` makes those steps' loss NaN (in any run).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from neo_model import GPTNeo, GPTNeoConfig
from neo_model.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint, should_save,
                                  training_state)
from neo_model.hf_io import write_pretrained
from neo_model.parallel import full_tensor, shard
from tasks.core.train_config import TrainConfig
from tasks.train.loader import TokenLoader
from tasks.train.maths import (batch_shape, lr_at, make_optimizer,  # noqa: F401 (re-exported)
                              peak_flops, peak_memory_mb, step_loss, total_steps)

PROGRESS = "NEO_PROGRESS "
METRICS = "NEO_METRICS "
ERROR = "NEO_ERROR "
KILL_AT, FAIL_AT, NAN_AT = "NEO_TRAIN_TEST_KILL_AT_STEP", "NEO_TRAIN_TEST_FAIL_AT_STEP", "NEO_TRAIN_TEST_NAN_STEPS"
RESULT = "train_result.json"

# ---------------------------------------------------------------------------- metrics


def system_metrics() -> dict[str, float]:
    try:
        import psutil
    except ImportError:
        return {}
    proc = psutil.Process()
    out = {"system/cpu_percent": psutil.cpu_percent(interval=None),
           "system/rss_mb": proc.memory_info().rss / 2**20,
           "system/memory_percent": psutil.virtual_memory().percent}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["system/gpu_memory_used_mb"] = (total - free) / 2**20
    return out


# ---------------------------------------------------------------------------- distributed


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


# ---------------------------------------------------------------------------- the loop


def validate(model: Callable, loader: TokenLoader, batches: int, device: torch.device, world: int,
             autocast: Any, sharded: bool = False) -> float:
    """Mean validation loss over the first `batches` micro-batches of the val order (all ranks). A
    sharded model's forward is a collective: a rank left without rows runs one on a dummy row, unscored."""
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "position": 0})
    was = getattr(model, "training", True)
    model.eval() if hasattr(model, "eval") else None
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            if not len(x) and sharded:
                with autocast:
                    model(torch.zeros(1, loader.seq_len, dtype=torch.long, device=device))
            if len(x):
                with autocast:
                    _, loss = model(x.to(device), targets=y.to(device))
                acc += torch.tensor([loss.double().item() * y.numel(), y.numel()], dtype=torch.float64,
                                    device=device)
    if was and hasattr(model, "train"):
        model.train()
    acc = _all_sum(acc, world)
    return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")


def _hook_step(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def train_loop(spec: dict[str, Any], emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Train to the spec's end (resuming from the newest checkpoint); return the result (rank 0)."""
    cfg = TrainConfig(**spec["train"])
    rank, world, device = setup_distributed(cfg)
    say = emit if rank == 0 else (lambda m: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(spec["out_dir"])
    ckpt_root = out / "checkpoints"
    tokens_dir = spec["tokens_dir"]

    loader = TokenLoader(tokens_dir, "train", batch_size=1, seed=cfg.seed, rank=rank, world_size=world,
                         drop_last=True)
    seq_len = loader.seq_len
    rows_per_step, per_rank, accum = batch_shape(cfg, seq_len, world)
    loader.batch_size = per_rank
    if loader.num_rows < rows_per_step:
        raise ValueError(f"the train split has {loader.num_rows} rows, fewer than one batch of "
                         f"{rows_per_step}")
    steps_total = total_steps(cfg, rows_per_step, seq_len)
    sched = cfg.model_copy(update={"max_steps": steps_total})
    tokens_per_step = rows_per_step * seq_len

    torch.manual_seed(cfg.seed)
    mcfg = GPTNeoConfig.from_hf_dict(spec["model"])
    net = GPTNeo(mcfg)
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None and spec.get("init_dir"):
        src = GPTNeo.from_pretrained(spec["init_dir"])
        net.load_state_dict(src.state_dict())
        del src
    net.to(device)
    n_params, fpt = net.num_parameters(), net.flops_per_token(seq_len)
    sharded = world > 1 and cfg.parallel == "fsdp"
    if sharded:
        shard(net, world, device, bf16=device.type == "cuda")
    opt = make_optimizer(net, cfg, device)
    step, tokens_seen, skipped, best_val = 0, 0, 0, None
    resumed = ckpt is not None
    if resumed:
        state = load_checkpoint(ckpt, net, opt, rank=rank)
        step, tokens_seen = state["step"], state["tokens_seen"]
        skipped = state.get("skipped_steps", 0)
        loader.load_state_dict(state["loader"])
        say(f"resuming from {ckpt} (step {step}, MLflow run {state['run_id']}, "
            f"saved on {state.get('world_size', 1)} process(es), now {world})")
    model: Any = net
    if world > 1 and not sharded:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(model) if cfg.compile else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    val_loader = None
    if cfg.val_every:
        val_loader = TokenLoader(tokens_dir, "val", batch_size=per_rank // accum, seed=cfg.seed,
                                 rank=rank, world_size=world)

    run_id = spec.get("run_id")
    peak = peak_flops(cfg, device)
    kill_at, fail_at = _hook_step(KILL_AT), _hook_step(FAIL_AT)
    nan_steps = {int(s) for s in os.environ.get(NAN_AT, "").split(",") if s.strip()}
    mode = ("FSDP" if sharded else "DDP") if world > 1 else "single process"
    say(f"training {n_params:,} parameters on {world} x {device.type} ({mode}): {steps_total} steps of "
        f"{rows_per_step} rows ({tokens_per_step:,} tokens, {accum} micro-batch(es) per process)")

    stream = loader.stream()
    model.train()
    loss_val, grad_val, consecutive, last_good = float("nan"), float("nan"), 0, step
    t_last, tok_last, t_start, step_start = time.perf_counter(), tokens_seen, time.perf_counter(), step
    val_loss = None
    while step < steps_total:
        if not resumed and kill_at == step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if not resumed and fail_at == step:
            raise RuntimeError(f"test hook: injected failure before step {step}")
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        lr = lr_at(step, sched)
        for group in opt.param_groups:
            group["lr"] = lr
        x_all, y_all = next(stream)
        step_ce = torch.zeros((), device=device)
        for i, (x, y) in enumerate(zip(x_all.split(per_rank // accum), y_all.split(per_rank // accum))):
            sync = contextlib.nullcontext()
            if sharded:
                net.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per step
            elif world > 1 and i < accum - 1:
                sync = model.no_sync()
            with sync:
                with autocast:
                    ce, objective = step_loss(fwd, x.to(device, non_blocking=True),
                                              y.to(device, non_blocking=True), cfg.z_loss)
                if step in nan_steps:
                    objective = objective * float("nan")
                    ce = ce * float("nan")
                (objective / accum).backward()
            step_ce += ce.detach() / accum
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
        bad = (~torch.isfinite(step_ce) | ~torch.isfinite(grad_norm)).float()
        both = _all_sum(torch.stack([step_ce.float(), bad]), world)
        loss_val, is_bad = float(both[0]) / world, bool(both[1] > 0)  # every rank decides the same
        grad_val = float(grad_norm)
        if is_bad:
            opt.zero_grad(set_to_none=True)
            skipped += 1
            consecutive += 1
            say(f"step {step + 1}: non-finite loss or gradient (loss {loss_val}, grad norm {grad_val}); "
                f"skipped ({consecutive} in a row, {skipped} in all)")
            if consecutive >= cfg.nan_tolerance:
                raise FloatingPointError(
                    f"non-finite loss or gradient at {consecutive} consecutive steps (the last at step "
                    f"{step + 1}, loss {loss_val}); the run stops. The last good checkpoint (step "
                    f"{last_good}) is kept in {ckpt_root} and a rerun resumes from it")
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            consecutive = 0
        step += 1
        tokens_seen += tokens_per_step

        val_now = cfg.val_every and (step % cfg.val_every == 0 or step == steps_total)
        if val_now:
            val_loss = validate(net, val_loader, cfg.val_batches, device, world, autocast, sharded)
            best_val = val_loss if best_val is None else min(best_val, val_loss)
        if rank == 0 and (step % cfg.log_every == 0 or step == steps_total):
            now = time.perf_counter()
            tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens_seen
            metrics = {"train_loss": loss_val, "lr": lr, "grad_norm": grad_val, "tokens_per_s": tps,
                       "flops_per_s": tps * fpt, "peak_memory_mb": peak_memory_mb(device),
                       "skipped_steps": skipped, "tokens_seen": tokens_seen, **system_metrics()}
            if peak:
                metrics["mfu"] = tps * fpt / (peak * world)
            if val_now:
                metrics["val_loss"] = val_loss
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
            say(METRICS + json.dumps({"step": step, "metrics": metrics}))
            rate = (step - step_start) / max(now - t_start, 1e-9)
            eta = (steps_total - step) / rate if rate > 0 else None
            say(f"step {step}/{steps_total} loss {loss_val:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
                + (f" val {val_loss:.4f}" if val_now else ""))
            say(PROGRESS + json.dumps({"step": step, "max_steps": steps_total, "loss": loss_val,
                                       "tokens_per_s": tps, "eta_s": eta, "val_loss": val_loss}))
        # no checkpoint inside a streak of skipped steps: the last good one stays the newest
        if should_save(step, cfg.checkpoint_every, steps_total) and (consecutive == 0 or step == steps_total):
            weights, optim = training_state(net, opt) if sharded or rank == 0 else ({}, {})
            if rank == 0:
                state = {"tokens_seen": tokens_seen, "run_id": run_id,
                         "train_fingerprint": spec.get("fingerprint"), "loader": loader.state_dict(),
                         "skipped_steps": skipped, "world_size": world}
                if val_now:
                    state["val_loss"] = val_loss
                save_checkpoint(ckpt_root, step, mcfg, weights, optim, state, keep=cfg.keep_last)
            del weights, optim
            _barrier(world)
            last_good = step

    result = {"steps": step, "tokens_seen": tokens_seen, "final_loss": loss_val, "skipped_steps": skipped,
              "num_parameters": n_params, "device": device.type, "world_size": world,
              "val_loss": val_loss, "best_val_loss": best_val, "flops_per_token": fpt}
    weights = training_state(net, None)[0] if sharded or rank == 0 else {}
    if rank == 0:
        model_dir = out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        write_pretrained(mcfg, weights, model_dir)
        (out / RESULT).write_text(json.dumps(result, indent=2))
    _barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return result


def log_loss_curve(client: Any, run_id: str) -> None:
    """The whole run's train (and val) loss history, restarts included, as an image artifact."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if hist:
            ax.plot(*zip(*hist), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    client.log_figure(run_id, fig, "loss_curve.png")
    plt.close(fig)
