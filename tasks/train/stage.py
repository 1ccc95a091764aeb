"""Train stage: pre-train GPT-Neo on the packed token rows, resumable, logged to one MLflow run.

The run directory `train/<fp>/` holds `train_spec.json`, `checkpoints/step-*/` (see
neo_model.checkpoint) and, when training finishes, `model/` (Hugging Face format + tokenizer.json)
and the manifest. The loop itself lives in tasks/train/trainer.py and runs in a subprocess
(`python -m tasks.train.entry`, or `torchrun` when `train.nproc` > 1) whose output is streamed into
the task's log; a crashed or retried training resumes from the newest checkpoint and keeps logging
into the same MLflow run, whose id is stored in every checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from neo_model import GPTNeoConfig
from neo_model.checkpoint import latest_checkpoint, read_state
from tasks.core.train_config import ModelConfig, TrainConfig
from tasks.train.export import write_tokenizer_files
from tasks.core.protocol import Computed, Stage, StageResult, file_entry, run_stage
from tasks.core import tracking
from tasks.train.curves import log_loss_curve
from tasks.train.spec import TrainSpec
from tasks.train.trainer import ERROR, METRICS, PROGRESS, RESULT, train_loop

STAGE = Stage("train", version=3, module=__name__, section="train", inputs=("tokenize",),
              info_keys=("run_id", "model_dir", "steps", "final_loss", "tokens_seen", "num_parameters",
                         "skipped_steps", "val_loss", "init_from", "train_wall_s", "train_cpu_s"))
NOT_FINGERPRINTED = {"in_process", "nproc", "parallel", "nnodes", "rdzv_endpoint"}  # how
# the loop is launched, not what it computes: a run resumes on another number of processes and under
# DDP or FSDP (both equal one process to fp32 rounding on CPU; consolidated checkpoints)


def plan(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return STAGE.plan({"train": cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
                       "model": model.model_dump(mode="json")}, [upstream.fingerprint], workspace)


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


def _start_run(workspace: str, cfg: TrainConfig, fp: str, name: str) -> str:
    c = tracking.client(workspace)
    exp = tracking.experiment_id(c, cfg.experiment, workspace)
    run = c.create_run(exp, run_name=name, tags={"neo.stage": "train", "neo.train_fingerprint": fp})
    return run.info.run_id


def resolve_init(cfg: TrainConfig, workspace: str, out: Path) -> str | None:
    """A local directory (config.json + model.safetensors) holding the starting weights, or None.

    `scratch` -> None; a checkpoint or Hugging Face GPT-Neo directory -> itself; `models:/NAME@alias`
    or `models:/NAME/VERSION` -> the registered version's `hf_model` artifacts, downloaded once."""
    src = cfg.init_from
    if src == "scratch":
        return None
    if src.startswith("models:/"):
        name, _, ref = src[len("models:/"):].partition("@")
        c = tracking.client(workspace)
        if ref:
            mv = c.get_model_version_by_alias(name, ref)
        else:
            name, _, version = name.partition("/")
            mv = c.get_model_version(name, version)
        dest = out / "init_model"
        if not (dest / "hf_model" / "config.json").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            c.download_artifacts(mv.run_id, "hf_model", str(dest))
        return str(dest / "hf_model")
    path = Path(src).expanduser()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(f"train.init_from={src!r}: not 'scratch', a models:/ URI, or a directory with "
                         f"config.json and safetensors weights (a checkpoint or Hugging Face GPT-Neo)")
    return str(path.resolve())


def init_model_config(init_dir: str | None, model: ModelConfig, tokens: StageResult) -> GPTNeoConfig:
    """The preset's config, or the starting model's own when training continues from one."""
    if init_dir is None:
        return model_config(model, tokens)
    cfg = GPTNeoConfig.from_hf_dict(json.loads((Path(init_dir) / "config.json").read_text()))
    if cfg.vocab_size < tokens.info["vocab_size"]:
        raise ValueError(f"init_from model vocab_size {cfg.vocab_size} < tokenizer vocab "
                         f"{tokens.info['vocab_size']}: it was trained with another tokenizer")
    if cfg.max_position_embeddings < tokens.info["seq_len"]:
        raise ValueError(f"init_from model has {cfg.max_position_embeddings} positions, fewer than "
                         f"tokenizer.seq_len {tokens.info['seq_len']}")
    return cfg


def torchrun_args(cfg: TrainConfig, node_rank: int = 0) -> list[str]:
    """torchrun's flags: --standalone on one node; on several, static rendezvous at node 0's
    train.rdzv_endpoint (this task runs node 0, so global rank 0 prints the metrics here; node k runs
    `torchrun` with these flags for `node_rank=k` on the same spec). Other torchrun settings pass
    through as its PET_* environment variables (e.g. PET_MAX_RESTARTS)."""
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        return ["--standalone", f"--nproc_per_node={cfg.nproc}"]
    host, _, port = cfg.rdzv_endpoint.rpartition(":")
    return [f"--nnodes={cfg.nnodes}", f"--nproc_per_node={cfg.nproc}", f"--node_rank={node_rank}",
            f"--master_addr={host}", f"--master_port={port}"]


def launch(spec_path: Path, cfg: TrainConfig, on_line: Callable[[str], None]) -> None:
    """Run the loop in a subprocess (torchrun for nproc > 1), streaming each output line to
    `on_line`; raise the subprocess's error (its type when it is a FloatingPointError, ValueError
    or RuntimeError) when it fails. The subprocess is killed if the caller is interrupted."""
    entry = ["-m", "tasks.train.entry", str(spec_path)]
    cmd = [sys.executable, *entry]
    if cfg.nproc > 1 or cfg.nnodes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg), *entry]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=40)
    error: dict | None = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=env)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(ERROR) and error is None:
                error = json.loads(line[len(ERROR):])
                continue
            on_line(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc == 0:
        return
    how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    if error is not None:
        kind = {"FloatingPointError": FloatingPointError, "ValueError": ValueError}.get(error["type"],
                                                                                        RuntimeError)
        raise kind(f"{error['message']} [training subprocess {error['type']}, {how}]")
    raise RuntimeError(f"training subprocess failed ({how}); last output:\n" + "\n".join(tail))


NPROC_ENV = "NEO_TRAIN_NPROC"
"""Set by the host (e.g. infra/k8s/gpu-job-template.json: the GPUs the pod got): overrides
`train.nproc` at launch. nproc is a launch setting, so the run's fingerprint does not change."""


def host_settings(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the host's process count from NEO_TRAIN_NPROC, validated like the config."""
    value = os.environ.get(NPROC_ENV, "").strip()
    if not value or cfg.in_process:
        return cfg
    try:
        return TrainConfig.model_validate({**cfg.model_dump(), "nproc": int(value)})
    except ValidationError as exc:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"{NPROC_ENV}={value!r} does not fit the train config: {why}") from None
    except ValueError:
        raise ValueError(f"{NPROC_ENV}={value!r} is not a whole number of processes") from None


def run_train(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str,
              run_name: str = "neo-train", log=print,
              progress: Callable[[dict[str, Any]], None] | None = None) -> StageResult:
    """Train to the config's end in a subprocess (or in-process), resuming from the newest checkpoint
    of a partial run in the same MLflow run; the output is the final model in Hugging Face format."""
    cfg = host_settings(cfg)
    planned = plan(cfg, model, upstream, workspace)
    return run_stage(STAGE, planned, config={"train": cfg.model_dump(mode="json"),
                                             "model": model.model_dump(mode="json")},
                     inputs=[upstream.fingerprint], upstream=[upstream], resume=True,
                     compute=lambda out: _train(cfg, model, upstream, workspace, planned[0], out,
                                                run_name, log, progress))


def _train(cfg: TrainConfig, model: ModelConfig, upstream: StageResult, workspace: str, fp: str, out: Path,
           run_name: str, log: Callable[[str], None],
           progress: Callable[[dict[str, Any]], None] | None) -> Computed:
    init_dir = resolve_init(cfg, workspace, out)
    # the rows' length goes with the model: evaluation scores in windows of the context it learned
    mcfg = replace(init_model_config(init_dir, model, upstream), trained_context=upstream.info["seq_len"])
    c = tracking.client(workspace)
    ckpt = latest_checkpoint(out / "checkpoints")
    run_id = read_state(ckpt).get("run_id") if ckpt is not None else None
    if run_id is None:
        run_id = _start_run(workspace, cfg, fp, run_name)  # config params: logged by register
    c.set_tag(run_id, "neo.init_from", cfg.init_from)
    if init_dir is not None:
        c.set_tag(run_id, "neo.init_dir", init_dir)
    spec = TrainSpec(train=cfg, model=mcfg.to_hf_dict(), tokens_dir=upstream.path, out_dir=str(out),
                     workspace=str(workspace), run_id=run_id, fingerprint=fp, init_dir=init_dir)
    spec_path = spec.write(out / "train_spec.json")

    def on_line(line: str) -> None:
        if line.startswith(METRICS):
            m = json.loads(line[len(METRICS):])
            tracking.log_metrics(c, run_id, m["metrics"], step=m["step"])
        elif line.startswith(PROGRESS):
            if progress is not None:
                progress(json.loads(line[len(PROGRESS):]))
        else:
            log(line)

    (out / RESULT).unlink(missing_ok=True)
    if cfg.in_process:
        train_loop(spec, emit=on_line)
    else:
        launch(spec_path, cfg, on_line)
    res = json.loads((out / RESULT).read_text())
    model_dir = out / "model"
    write_tokenizer_files(model_dir, Path(upstream.path) / "tokenizer.json")
    log_loss_curve(c, run_id)
    c.set_tag(run_id, "neo.device", res["device"])
    c.set_tag(run_id, "neo.world_size", str(res["world_size"]))
    if cfg.budgeted:  # the run's length was time: say how much it got and used
        c.set_tag(run_id, "neo.train_budget", f"max_time={cfg.max_time} max_cpu_time={cfg.max_cpu_time}")
        c.set_tag(run_id, "neo.train_used", f"wall {res['train_wall_s']:.1f} s, cpu {res['train_cpu_s']:.1f} s, "
                                            f"{res['steps']} steps")
    c.set_terminated(run_id, "FINISHED")
    files = [file_entry(p, out) for p in sorted(model_dir.iterdir())]
    return Computed({"steps": res["steps"], "tokens_seen": res["tokens_seen"],
                     "skipped_steps": res["skipped_steps"]}, files, info=dict(
        neo_model=mcfg.to_hf_dict(), run_id=run_id, model_dir=str(model_dir), steps=res["steps"],
        final_loss=res["final_loss"], tokens_seen=res["tokens_seen"], num_parameters=res["num_parameters"],
        device=res["device"], skipped_steps=res["skipped_steps"], val_loss=res["val_loss"],
        init_from=cfg.init_from, world_size=res["world_size"], train_wall_s=res.get("train_wall_s"),
        train_cpu_s=res.get("train_cpu_s")))


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report lines of a train result."""
    i = result.info
    val = i.get("val_loss")
    return (f"trained {result.counts['steps']} steps, final loss {i['final_loss']:.4f}, MLflow run {i['run_id']}",
            [f"- MLflow run: `{i['run_id']}`", f"- started from: `{i.get('init_from', 'scratch')}`",
             f"- parameters: {i['num_parameters']:,}", f"- final train loss: {i['final_loss']:.4f}",
             f"- skipped (non-finite) steps: {i.get('skipped_steps', 0)}",
             *([f"- final val loss: {val:.4f}"] if val is not None else [])])
