"""`neo plan`: size a pre-training job from a pipeline config before renting GPUs.

The model shape is the one the train stage would build (the preset, the tokenizer's vocabulary, then
model.overrides); rows per step and the micro-batch come from the train section as the trainer splits
them (`tasks.train.maths.batch_shape`). The arithmetic and its assumptions are in `neo_model.sizing`.
"""
from __future__ import annotations

import math
import re

import typer

from tasks.core.config import load_config

HEADROOM = 0.10  # of GPU memory, kept for the CUDA context, cuBLAS/NCCL workspaces and fragmentation
LAYOUTS = {"ddp": ("ddp", False), "ddp+ckpt": ("ddp", True), "fsdp": ("fsdp", False), "fsdp+ckpt": ("fsdp", True)}
COMPONENTS = {  # key in neo_model.sizing.Memory.parts -> row label
    "weights": "weights (fp32 master)",
    "gradients": "gradients (fp32)",
    "ddp_buckets": "DDP gradient buckets (fp32)",
    "adamw_moments": "AdamW moments (2 x fp32)",
    "weight_copies": "bf16 weight copies",
    "fsdp_buffers": "FSDP gather/reduce buffers",
    "fsdp_unsharded_grads": "FSDP unsharded grads (accum)",
    "activations": "activations (saved)",
    "transient": "backward transient",
}
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_number(text: str, name: str, *, integer: bool = False, low: float = 0.0, high: float | None = None,
                 low_inclusive: bool = False) -> float:
    """`380e9`, `380B`, `1.5T`, `2_000`, `0.4` -> a number in range, else ValueError naming the option."""
    m = re.fullmatch(r"\s*([+-]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)\s*([KkMmBbGgTt]?)\s*",
                     str(text))
    value = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()] if m else math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name}: {text!r} is not a number")
    if integer and value != int(value):
        raise ValueError(f"{name}: {text!r} is not a whole number")
    if value < low or (value == low and not low_inclusive) or (high is not None and value > high):
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{name} must be {bound}, got {text!r}")
    return int(value) if integer else value


def make_plan(config: str, overrides: list[str], *, gpus: str = "1", gpu_mem: str = "80",
              tokens: str | None = None, mfu: str = "0.4", peak_tflops: str = "989",
              headroom: str = str(HEADROOM)) -> dict:
    """Everything `neo plan` prints, as plain data (bytes for memory). Raises ConfigError / ValueError."""
    from neo_model import GPTNeoConfig
    from neo_model import sizing
    from tasks.train.maths import batch_shape

    n_gpus = parse_number(gpus, "--gpus", integer=True)
    mem_gib = parse_number(gpu_mem, "--gpu-mem")
    util = parse_number(mfu, "--mfu", high=1.0)
    peak = parse_number(peak_tflops, "--peak-tflops") * 1e12
    spare = parse_number(headroom, "--headroom", high=0.99, low_inclusive=True)
    cfg = load_config(config, overrides)
    seq_len = cfg.tokenizer.seq_len
    try:  # the train stage's shape: the preset, the tokenizer's vocabulary, then model.overrides
        model = GPTNeoConfig.from_preset(cfg.model.preset, **{"vocab_size": cfg.tokenizer.vocab_size,
                                                              **cfg.model.overrides})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model: {exc}") from None
    if model.max_position_embeddings < seq_len:
        raise ValueError(f"tokenizer.seq_len ({seq_len}) exceeds the model's max_position_embeddings "
                         f"({model.max_position_embeddings})")
    rows, per_gpu, accum = batch_shape(cfg.train, seq_len, n_gpus)
    micro = per_gpu // accum
    fpt = sizing.flops_per_token(model, seq_len)
    if tokens is None and cfg.train.budgeted:
        raise ValueError("the config trains for a time budget (train.max_time/max_cpu_time): pass --tokens")
    if tokens is None:  # the config's own training length
        n_tokens = float(cfg.train.max_tokens or cfg.train.max_steps * rows * seq_len)
    else:
        n_tokens = parse_number(tokens, "--tokens")
    budget = mem_gib * (1 - spare) * sizing.GiB
    counts = sizing.param_counts(model)
    memory, fit = {}, {}
    for name, (strategy, ckpt) in LAYOUTS.items():
        kw = dict(strategy=strategy, gpus=n_gpus, precision="bf16", checkpointing=ckpt)
        m = sizing.training_memory(model, micro, seq_len, accum=accum, **kw)
        memory[name] = {"parts": m.parts, "total": m.total, "phase": m.phase, "fits": m.total <= budget}
        fit[name] = {"dividing": sizing.max_micro_batch(model, seq_len, budget, rows_per_gpu=per_gpu, **kw),
                     "any": sizing.max_micro_batch(model, seq_len, budget, **kw)}
    speed = sizing.throughput(fpt, n_gpus, util, peak, n_tokens)
    return {
        "config": cfg.name, "preset": cfg.model.preset,
        "model": {"vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
                  "num_layers": model.num_layers, "num_heads": model.num_heads, "head_dim": model.head_dim,
                  "inner_size": model.inner_size, "window_size": model.window_size,
                  "max_position_embeddings": model.max_position_embeddings, "seq_len": seq_len},
        "parameters": {k: counts[k] for k in ("total", "non_embedding", "embedding")},
        "flops_per_token": fpt,
        "job": {"gpus": n_gpus, "gpu_mem_gib": mem_gib, "headroom": spare, "budget_bytes": int(budget),
                "rows_per_step": rows, "tokens_per_step": rows * seq_len, "rows_per_gpu": per_gpu,
                "micro_batch": micro, "accum": accum},
        "precision": "bf16 compute (autocast; FSDP2 bf16 params, fp32 reduce), fp32 master weights, "
                     "grads, AdamW",
        "memory": memory, "max_micro_batch": fit,
        "throughput": {"mfu": util, "peak_flops": peak, "tokens": n_tokens,
                       "steps": math.ceil(n_tokens / (rows * seq_len)), **speed},
    }


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.2f}"


def _count(n: float, units: str = "KMBT") -> str:
    """1.5e12 -> '1.5T'; with units 'kMGT', 8.5e9 -> '8.5G'."""
    for unit, size in reversed(list(zip(units, (1e3, 1e6, 1e9, 1e12)))):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def render(p: dict) -> str:
    """The plan as a readable table."""
    m, j, s, c = p["model"], p["job"], p["throughput"], p["parameters"]
    cols = list(LAYOUTS)
    width = 30
    lines = [
        f"neo plan: {p['config']} (preset {p['preset']}): {m['num_layers']} layers, d {m['hidden_size']}, "
        f"{m['num_heads']} heads x {m['head_dim']}, vocab {m['vocab_size']:,}, window {m['window_size']}, "
        f"T {m['seq_len']}",
        f"{'parameters':<{width}}{c['total']:,} total, {c['non_embedding']:,} non-embedding "
        f"(embeddings {c['embedding']:,})",
        f"{'FLOPs per token':<{width}}{p['flops_per_token']:,} ({_count(p['flops_per_token'], 'kMGT')} FLOP: 6N + attention)",
        f"{'batch':<{width}}{j['rows_per_step']:,} rows x {m['seq_len']} = {j['tokens_per_step']:,} tokens/step; "
        f"{j['rows_per_gpu']} rows/GPU = micro-batch {j['micro_batch']} x {j['accum']} accumulated",
        "",
        f"memory per GPU (GiB) at micro-batch {j['micro_batch']}, {j['gpus']} GPU(s) x {j['gpu_mem_gib']:g} GiB",
        f"precision: {p['precision']}",
        f"{'':<{width}}" + "".join(f"{col:>12}" for col in cols),
    ]
    for key, label in COMPONENTS.items():
        values = [p["memory"][col]["parts"].get(key, 0) for col in cols]
        if any(values):
            lines.append(f"{label:<{width}}" + "".join(f"{_gib(v):>12}" for v in values))
    fits_label = f"fits in {_gib(j['budget_bytes'])} GiB ({j['headroom']:.0%} spare)"
    dividing_label = f"  ... dividing {j['rows_per_gpu']} rows/GPU"
    lines += [
        f"{'total (peak)':<{width}}" + "".join(f"{_gib(p['memory'][col]['total']):>12}" for col in cols),
        f"{fits_label:<{width}}" + "".join(f"{'yes' if p['memory'][col]['fits'] else 'NO':>12}" for col in cols),
        f"{'largest micro-batch that fits':<{width}}"
        + "".join(f"{p['max_micro_batch'][col]['any']:>12,}" for col in cols),
        f"{dividing_label:<{width}}" + "".join(f"{p['max_micro_batch'][col]['dividing']:>12,}" for col in cols),
        "",
        f"{'throughput':<{width}}{s['tokens_per_s']:,.0f} tokens/s ({s['tokens_per_s_per_gpu']:,.0f} per GPU) at "
        f"MFU {s['mfu']:g} of {s['peak_flops'] / 1e12:g} TFLOP/s per GPU",
        f"{'time to train':<{width}}{s['days']:,.1f} days for {_count(s['tokens'])} tokens ({s['steps']:,} steps)",
        "",
        "notes: backward transient = cross-entropy backward (the fp32 gradients of log-probabilities and",
        "logits, 8 bytes x rows x seq_len x vocab, beside the 4 saved); +ckpt = per-block activation",
        "checkpointing (not a train option today; its recompute costs ~1/3 more hardware FLOPs at one MFU).",
    ]
    if j["accum"] > 1:
        lines.append("FSDP with accumulation: FSDP2 keeps unsharded fp32 gradients between syncs (4 bytes x N")
        lines.append("per GPU). Formulas and what they leave out: neo_model/sizing.py.")
    else:
        lines.append("Formulas and what they leave out: neo_model/sizing.py.")
    return "\n".join(lines)


def command(config: str = typer.Option("tiny", "-c", "--config", help="Preset name in configs/ or a YAML path."),
            set_: list[str] = typer.Option([], "--set", help="Override: section.key=value (repeatable)."),
            gpus: str = typer.Option("1", "--gpus", metavar="N", help="GPUs in the job (DDP replicas / FSDP shards)."),
            gpu_mem: str = typer.Option("80", "--gpu-mem", metavar="GIB", help="Memory per GPU, GiB."),
            tokens: str | None = typer.Option(None, "--tokens", metavar="N",
                                              help="Tokens to train on, e.g. 380e9 or 380B (default: the config's)."),
            mfu: str = typer.Option("0.4", "--mfu", metavar="F", help="Model FLOPs utilisation to assume."),
            peak_tflops: str = typer.Option("989", "--peak-tflops", metavar="T",
                                         help="Peak dense bf16 TFLOP/s per GPU (H100 SXM: 989)."),
            headroom: str = typer.Option("0.1", "--headroom", metavar="F", help="Share of GPU memory kept spare."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output (memory in bytes).")) -> None:
    """Size a training job: parameters, FLOPs/token, memory per GPU (DDP/FSDP), micro-batch that fits, days."""
    import json

    try:
        p = make_plan(config, set_, gpus=gpus, gpu_mem=gpu_mem, tokens=tokens, mfu=mfu,
                      peak_tflops=peak_tflops, headroom=headroom)
    except ValueError as exc:  # ConfigError included: one line, exit 2, like every neo verb
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(p, indent=2) if as_json else render(p))
