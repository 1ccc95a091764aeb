"""Train stage: pre-train GPT-Neo on the packed token rows, resumable, logged to one MLflow run.

The run directory `runs/<fp>/` holds `checkpoints/step-*/` (see neo_model.checkpoint) and, when
training finishes, `model/` (Hugging Face format + tokenizer.json) and the manifest. A crashed or
retried training resumes from the newest checkpoint and keeps logging into the same MLflow run,
whose id is stored in every checkpoint.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from neo_model import GPTNeo, GPTNeoConfig
from neo_model.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, should_save
from tasks.config import ModelConfig, TrainConfig
from tasks.export import write_tokenizer_files
from tasks.stage import (StageResult, code_version, file_entry, fingerprint, read_manifest,
                         result_from_manifest, stage_dir, write_manifest)
from tasks.tokenize import read_rows
from tasks import tracking

STAGE = "train"
VERSION = 1
INFO_KEYS = ("run_id", "model_dir", "steps", "final_loss", "tokens_seen", "num_parameters")


def plan(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, {"train": cfg.model_dump(mode="json"), "model": model.model_dump(mode="json")},
                     [upstream.fingerprint], code)
    return fp, stage_dir(workspace, "runs", fp)


def model_config(model: ModelConfig, tokens: StageResult) -> GPTNeoConfig:
    """The preset's shape, the tokenizer's vocabulary and ids, then the user's overrides."""
    info = tokens.info
    overrides = {"vocab_size": info["vocab_size"], "bos_token_id": info["eos_id"],
                 "eos_token_id": info["eos_id"], **model.overrides}
    cfg = GPTNeoConfig.from_preset(model.preset, **overrides)
    if cfg.max_position_embeddings < info["seq_len"]:
        raise ValueError(f"model.overrides.max_position_embeddings ({cfg.max_position_embeddings}) "
                         f"is shorter than tokenizer.seq_len ({info['seq_len']})")
    if cfg.vocab_size < info["vocab_size"]:
        raise ValueError(f"model vocab_size {cfg.vocab_size} < tokenizer vocab {info['vocab_size']}")
    return cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak (EleutherAI's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    """Rows for `step`: a fresh seeded permutation per epoch, so the batch depends only on the step
    (exact resume from a step counter, independent of how many times training was restarted)."""
    g = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, pos = g // n_rows, g % n_rows
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_rows)
        out[epochs == e] = perm[pos[epochs == e]]
    return out


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not biases, LayerNorms); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _start_run(workspace: str, cfg: TrainConfig, fp: str, name: str) -> str:
    c = tracking.client(workspace)
    exp = tracking.experiment_id(c, cfg.experiment, workspace)
    run = c.create_run(exp, run_name=name, tags={"neo.stage": "train", "neo.train_fingerprint": fp})
    return run.info.run_id


def run_train(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str,
              run_name: str = "neo-train", log=print) -> StageResult:
    fp, out = plan(cfg, model, upstream, workspace)
    if (m := read_manifest(out)) is not None:
        return result_from_manifest(out, m, reused=True, info_keys=INFO_KEYS)
    started = time.time()
    device = pick_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(model, upstream)
    net = GPTNeo(mcfg).to(device)
    opt = make_optimizer(net, cfg, device)
    rows, _ = read_rows(upstream.path, "train")
    rows_t = torch.from_numpy(rows.astype(np.int64))
    n_rows = rows_t.shape[0]

    ckpt_root = out / "checkpoints"
    step, tokens_seen, run_id = 0, 0, None
    if (ckpt := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(ckpt, net, opt)
        step, tokens_seen, run_id = state["step"], state["tokens_seen"], state["run_id"]
        log(f"resuming from {ckpt} (step {step}, MLflow run {run_id})")
    if run_id is None:
        run_id = _start_run(workspace, cfg, fp, run_name)
    c = tracking.client(workspace)
    c.set_tag(run_id, "neo.device", device.type)
    n_params = net.num_parameters()
    tokens_per_step = cfg.batch_size * (rows.shape[1] - 1)

    net.train()
    loss_val, t_last, last_good = float("nan"), time.time(), step
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = rows_t[torch.from_numpy(batch_indices(step, cfg.batch_size, n_rows, cfg.seed))].to(device)
        _, loss = net(batch[:, :-1], targets=batch[:, 1:])
        loss_val = loss.item()
        if not math.isfinite(loss_val):
            raise FloatingPointError(
                f"non-finite loss ({loss_val}) at step {step} of run {run_id}; the last good "
                f"checkpoint (step {last_good}) is kept in {ckpt_root} and a rerun resumes from it")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip).item()
        opt.step()
        step += 1
        tokens_seen += tokens_per_step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.time()
            tps = tokens_per_step * cfg.log_every / max(now - t_last, 1e-9)
            t_last = now
            tracking.log_metrics(c, run_id, {"train_loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                                             "tokens_per_s": tps}, step=step)
            log(f"step {step}/{cfg.max_steps} loss {loss_val:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
        if should_save(step, cfg.checkpoint_every, cfg.max_steps):
            save_checkpoint(ckpt_root, step, net, opt, {"tokens_seen": tokens_seen, "run_id": run_id,
                                                        "train_fingerprint": fp})
            last_good = step

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    net.save_pretrained(model_dir)
    write_tokenizer_files(model_dir, Path(upstream.path) / "tokenizer.json")
    c.set_terminated(run_id, "FINISHED")
    files = [file_entry(p, out) for p in sorted(model_dir.iterdir())]
    manifest = write_manifest(
        out, stage=STAGE, fp=fp, code=code_version(__name__, VERSION),
        config={"train": cfg.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                "neo_model": mcfg.to_hf_dict()},
        inputs=[upstream.fingerprint], counts={"steps": step, "tokens_seen": tokens_seen},
        files=files, started=started, run_id=run_id, model_dir=str(model_dir), steps=step,
        final_loss=loss_val, tokens_seen=tokens_seen, num_parameters=n_params, device=device.type)
    return result_from_manifest(out, manifest, reused=False, info_keys=INFO_KEYS)


# ---------------------------------------------------------------------------- Prefect wrapper

from prefect import get_run_logger  # noqa: E402

from tasks.prefect_stage import report, stage_task  # noqa: E402


@stage_task(STAGE, plan, retries=1)
def train(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Pre-train GPT-Neo; a retry resumes from the newest checkpoint in the same MLflow run."""
    logger = get_run_logger()
    result = run_train(cfg, model, upstream, workspace, log=logger.info)
    logger.info(f"trained {result.counts['steps']} steps, final loss {result.info['final_loss']:.4f}, "
                f"MLflow run {result.info['run_id']}")
    report(STAGE, result, [f"- MLflow run: `{result.info['run_id']}`",
                           f"- parameters: {result.info['num_parameters']:,}",
                           f"- final train loss: {result.info['final_loss']:.4f}"])
    return result
