"""Evaluate stage: validation loss, perplexity and bits-per-byte, a unigram baseline, text samples.

Bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the predicted tokens, using the byte
counts recorded per packed row by the tokenize stage, so it is comparable across tokenizers. The
unigram baseline (a model that learned only the training split's token frequencies, add-one
smoothed) is scored on exactly the same targets: a trained model must beat it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from neo_model import GPTNeo
from tasks.core import tracking
from tasks.core.cpus import set_torch_threads
from tasks.tokenize.bpe import load_tokenizer
from tasks.core.train_config import EvalConfig
from tasks.evaluate.evals import run_task
from tasks.evaluate.evals.contamination import contaminated_fraction, example_texts, training_index
from tasks.core.protocol import (Computed, Stage, StageResult, file_entry, run_stage, sha256_file,
                                 write_json_atomic)
from tasks.tokenize.rows import read_rows

STAGE = Stage("evaluate", version=1, module=__name__, section="eval", inputs=("train", "tokenize"),
              info_keys=("metrics", "run_id", "model_dir", "samples_path", "report_path"))
LN2 = math.log(2)


def _task_files(cfg: EvalConfig) -> list[str]:
    """sha256 of every eval data file, so edited eval data re-runs the stage."""
    paths = sorted({p for t in cfg.tasks for p in (t.path, t.fewshot_path) if p})
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"eval task file(s) not found: {', '.join(missing)} (eval.tasks)")
    return [f"{p}:{sha256_file(Path(p))}" for p in paths]


def _inputs(cfg: EvalConfig, upstream: StageResult, tokens: StageResult) -> list[str]:
    return [upstream.fingerprint, tokens.fingerprint, *_task_files(cfg)]


def plan(cfg: EvalConfig, upstream: StageResult, tokens: StageResult, workspace: str) -> tuple[str, Path]:
    return STAGE.plan(cfg, _inputs(cfg, upstream, tokens), workspace)


@torch.no_grad()
def model_nll(model: GPTNeo, rows: np.ndarray, batch_size: int, max_batches: int | None) -> np.ndarray:
    """Per-row summed NLL (nats) of the targets rows[:, 1:], fp32."""
    model.eval()
    device = next(model.parameters()).device
    n = rows.shape[0] if max_batches is None else min(rows.shape[0], max_batches * batch_size)
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        batch = torch.from_numpy(rows[start:start + batch_size].astype(np.int64)).to(device)
        nll = model.token_nll(batch[:, :-1], batch[:, 1:])
        out[start:start + batch.shape[0]] = nll.double().sum(dim=1).cpu().numpy()
    return out


def unigram_nll(train_rows: np.ndarray, val_rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per-row summed NLL of val targets under add-one smoothed training-target frequencies."""
    counts = np.bincount(train_rows[:, 1:].ravel().astype(np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return -logp[val_rows[:, 1:].astype(np.int64)].sum(axis=1)


def summarize(nll: np.ndarray, n_bytes: np.ndarray, n_tokens: int) -> dict[str, float]:
    total = float(nll.sum())
    loss = total / n_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": total / LN2 / float(n_bytes.sum())}


def generate_samples(model: GPTNeo, tokenizer, cfg: EvalConfig, eos_id: int, seed: int = 0) -> list[dict]:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for i in range(cfg.samples):
        prompt = cfg.prompts[i % len(cfg.prompts)] if cfg.prompts else ""
        ids = tokenizer.encode(prompt).ids or [eos_id]
        x = torch.tensor([ids], dtype=torch.long, device=device)
        y = model.generate(x, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen)
        samples.append({"prompt": prompt, "completion": tokenizer.decode(y[0, len(ids):].tolist())})
    return samples


def training_texts(tokenizer, train_rows: np.ndarray, max_tokens: int, chunk: int = 65536):
    """The training token stream decoded back to text, in chunks (byte-level BPE is lossless)."""
    stream = np.concatenate([train_rows[:1, 0], train_rows[:, 1:].ravel()])[:max_tokens]
    for start in range(0, len(stream), chunk):
        yield tokenizer.decode(stream[start:start + chunk].astype(np.int64).tolist(), skip_special_tokens=False)


def score_tasks(cfg: EvalConfig, model: GPTNeo, tokenizer, train_rows: np.ndarray) -> dict[str, float]:
    """Every configured task's metrics as `<task>.<metric>`, plus its n-gram contamination share."""
    if not cfg.tasks:
        return {}
    out: dict[str, float] = {}
    n = cfg.contamination_ngram
    index = training_index(training_texts(tokenizer, train_rows, cfg.contamination_max_tokens), n)
    for spec in cfg.tasks:
        for k, v in run_task(spec, model, tokenizer).items():
            out[f"{spec.name}.{k}"] = float(v)
        out[f"{spec.name}.contamination_{n}gram"] = contaminated_fraction(example_texts(spec), index, n)
    return out


def report_markdown(metrics: dict[str, float], samples: list[dict], cfg: EvalConfig) -> str:
    """The evaluation report (Prefect artifact and MLflow artifact)."""
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if "." not in k]
    beat = metrics["val_bpb"] < metrics["unigram_val_bpb"]
    lines += ["", f"Validation bits-per-byte {metrics['val_bpb']:.4f} vs unigram baseline "
              f"{metrics['unigram_val_bpb']:.4f}: the model {'beats' if beat else 'does NOT beat'} it."]
    if cfg.tasks:
        lines += ["", "## Tasks", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {k.split('.', 1)[0]} | {k.split('.', 1)[1]} | {v:.4f} |" for k, v in metrics.items() if "." in k]
        lines += ["", f"`contamination_{cfg.contamination_ngram}gram`: share of a task's examples sharing a "
                  f"{cfg.contamination_ngram}-word sequence with the training data (GPT-3's test)."]
    lines += ["", "## Samples", *(f"- **{s['prompt']!r}** → `{s['completion'][:200]!r}`" for s in samples)]
    return "\n".join(lines) + "\n"


def run_evaluate(cfg: EvalConfig, upstream: StageResult, tokens: StageResult, workspace: str) -> StageResult:
    """Score the trained model (`upstream`) on the token stage's validation split, its eval tasks and
    samples; the metrics also go to the training's MLflow run."""
    inputs = _inputs(cfg, upstream, tokens)
    return run_stage(STAGE, STAGE.plan(cfg, inputs, workspace), config=cfg, inputs=inputs,
                     upstream=[upstream, tokens], compute=lambda out: _evaluate(cfg, upstream, tokens, workspace, out))


def validation_metrics(cfg: EvalConfig, model: GPTNeo, tokens_dir: str | Path) -> tuple[dict[str, float], np.ndarray]:
    """Loss, perplexity and bits-per-byte on the token directory's val split, with the unigram baseline
    on the same targets; and the train rows (the baseline's counts, the contamination index)."""
    val, val_bytes = read_rows(tokens_dir, "val")
    if cfg.max_batches is not None:
        keep = min(val.shape[0], cfg.max_batches * cfg.batch_size)
        val, val_bytes = val[:keep], val_bytes[:keep]
    train, _ = read_rows(tokens_dir, "train")
    n_targets = val.shape[0] * (val.shape[1] - 1)
    ours = summarize(model_nll(model, val, cfg.batch_size, None), val_bytes, n_targets)
    base = summarize(unigram_nll(train, val, model.config.vocab_size), val_bytes, n_targets)
    return {"val_loss": ours["loss"], "val_ppl": ours["ppl"], "val_bpb": ours["bpb"],
            "unigram_val_loss": base["loss"], "unigram_val_bpb": base["bpb"],
            "val_tokens": float(n_targets), "val_bytes": float(val_bytes.sum())}, train


def evaluate_model(cfg: EvalConfig, model_dir: str | Path, tokens_dir: str | Path | None = None) -> dict[str, float]:
    """The evaluate stage's metrics for any model directory, written nowhere (`neo eval`): validation
    metrics on `tokens_dir`'s val split when given, and every task in `cfg.tasks` (contamination
    against that directory's train split, none without one)."""
    if tokens_dir is None and not cfg.tasks:
        raise ValueError("nothing to evaluate: give a token directory (--tokens) or eval tasks (eval.tasks)")
    set_torch_threads()  # the CPUs this process may use, not the machine's
    model = GPTNeo.from_pretrained(model_dir)
    metrics, train = validation_metrics(cfg, model, tokens_dir) if tokens_dir else ({}, np.zeros((0, 2), np.int64))
    metrics.update(score_tasks(cfg, model, load_tokenizer(model_dir), train))
    return metrics


def _evaluate(cfg: EvalConfig, upstream: StageResult, tokens: StageResult, workspace: str, out: Path) -> Computed:
    set_torch_threads()  # the CPUs this process may use, not the machine's
    model = GPTNeo.from_pretrained(upstream.info["model_dir"])
    metrics, train = validation_metrics(cfg, model, tokens.path)
    n_targets = int(metrics["val_tokens"])
    val_rows = n_targets // tokens.info["seq_len"]  # each row holds seq_len targets
    tokenizer = load_tokenizer(tokens.path)
    metrics.update(score_tasks(cfg, model, tokenizer, train))
    samples = generate_samples(model, tokenizer, cfg, tokens.info["eos_id"])

    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "samples.json", samples)
    (out / "report.md").write_text(report_markdown(metrics, samples, cfg))
    files = [file_entry(out / name, out) for name in ("metrics.json", "samples.json", "report.md")]
    run_id = upstream.info["run_id"]
    tracking.log_metrics(tracking.client(workspace), run_id, metrics, step=upstream.counts.get("steps", 0))
    return Computed({"val_rows": val_rows, "val_tokens": n_targets, "samples": len(samples)}, files,
                    info=dict(metrics=metrics, run_id=run_id, model_dir=upstream.info["model_dir"],
                              samples_path=str(out / "samples.json"), report_path=str(out / "report.md")))


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report (the evaluation's own report.md) of an evaluate result."""
    m = result.info["metrics"]
    return (f"val loss {m['val_loss']:.4f}, ppl {m['val_ppl']:.2f}, bpb {m['val_bpb']:.4f} "
            f"(unigram baseline bpb {m['unigram_val_bpb']:.4f})", [Path(result.info["report_path"]).read_text()])
