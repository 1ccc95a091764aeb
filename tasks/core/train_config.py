"""Config sections of the model stages: model, train, eval, registry.

Every field has a docstring (shown in the Prefect run form); `tasks/core/config.py` composes the
sections into PipelineConfig and loads presets."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.core.section import Section

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)", re.I)


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a duration such as `90`, `90s`, `2m`, `1h30m`, `1.5h`."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ValueError(f"{value!r} is not a duration (seconds, or e.g. 90s, 2m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u.lower()] for n, u in parts)


class ModelConfig(Section):
    preset: Literal["debug", "tiny", "125m", "1.3b", "2.7b"] = "tiny"
    """GPT-Neo shape preset (neo_model.PRESETS)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """GPTNeoConfig fields that replace the preset's (HF field names, e.g. num_layers)."""


class TrainConfig(Section):
    max_steps: int = Field(default=500, gt=0)
    """Optimizer steps to train for."""
    batch_size: int = Field(default=16, gt=0)
    """Packed rows per optimizer step."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine decay ends at this fraction of the peak (EleutherAI: 10%)."""
    warmup_steps: int = Field(default=30, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay, applied to matrices only."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = CUDA when present, else CPU."""
    log_every: int = Field(default=10, gt=0)
    """Log metrics to MLflow every N steps."""
    checkpoint_every: int = Field(default=200, gt=0)
    """Write a resumable checkpoint every N steps (and at the end)."""
    threads: int | None = Field(default=None, gt=0)
    """torch CPU threads per training process (None = the CPUs this process may use, by affinity and
    cgroup quota, divided among the run's processes on this node)."""
    experiment: str = "neo-pipeline"
    """MLflow experiment the training run is recorded in."""
    micro_batch_size: int | None = Field(default=None, gt=0)
    """Rows per forward/backward on one process; `batch_size` must be a multiple of
    micro_batch_size * nproc (gradient accumulation fills the rest). None = batch_size / nproc."""
    batch_tokens: int | None = Field(default=None, gt=0)
    """Target batch in tokens per optimizer step; when set it replaces `batch_size` (rounded up to
    whole rows of seq_len tokens)."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Training length in target tokens; when set it replaces `max_steps`."""
    max_time: float | None = Field(default=None, gt=0)
    """Training length as a wall-clock budget (seconds, or e.g. `90s`, `2m`, `1h30m`) of the training
    loop, summed over restarts; when set (or max_cpu_time) it replaces max_steps and max_tokens, and
    the cosine decay follows the fraction of the budget used, so the run ends annealed at its floor."""
    max_cpu_time: float | None = Field(default=None, gt=0)
    """Training length as a CPU-time budget of the training process (all its threads; on several
    processes, the busiest one), like max_time; with both set, whichever runs out first."""
    z_loss: float = Field(default=0.0, ge=0)
    """Weight of the z-loss (logsumexp(logits)^2, PaLM); 0 = off."""
    compile: bool | Literal["auto"] = "auto"
    """Run the training step's forward and backward through torch.compile (inductor): true, false or
    auto. auto = compile on CUDA, not on CPU: there the compiled step measured no faster than the eager
    one (benchmarks/bench_model.py --compile; RESULTS.md, Model) and compiling takes ~80-100 s on a
    2-core machine. Compiled and eager losses agree to fp32 rounding (rtol 1e-4 over 20 steps)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision of the forward/backward: bf16 = torch.autocast to bfloat16 on the training
    device (CPU too; weights, gradients and AdamW state stay fp32), fp32 = none; auto = bf16 on CUDA,
    fp32 on CPU."""
    val_every: int = Field(default=0, ge=0)
    """Compute validation loss every M steps (and at the end); 0 = never during training."""
    val_batches: int = Field(default=4, gt=0)
    """Micro-batches of the val split per validation."""
    keep_last: int = Field(default=2, gt=0)
    """Checkpoints kept (plus the one with the best validation loss)."""
    nan_tolerance: int = Field(default=3, gt=0)
    """Consecutive steps with a non-finite loss or gradient (skipped) before the run stops."""
    init_from: str = "scratch"
    """Where the weights start: scratch, a checkpoint directory of an earlier run, an MLflow model
    (models:/NAME@alias or models:/NAME/VERSION) or a Hugging Face GPT-Neo directory; the optimizer
    starts fresh in all but scratch-and-resume."""
    nproc: int = Field(default=1, gt=0)
    """Processes (torchrun --nproc_per_node) the training runs in on this node; >1 uses `parallel`."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: DDP (full replicas) or FSDP2 (fully_shard per transformer block, bf16
    compute on CUDA); checkpoints are consolidated either way and resume under both."""
    nnodes: int = Field(default=1, gt=0)
    """Nodes (torchrun --nnodes); >1 needs rdzv_endpoint. The task's node is node 0 (global rank 0
    writes checkpoints and prints metrics); every other node runs the same torchrun command with its
    own --node_rank on the same spec (see README, Training)."""
    rdzv_endpoint: str | None = Field(default=None, pattern=r"^[^:\s]+:\d+$")
    """host:port of node 0 for multi-node runs (torchrun --master_addr/--master_port, static
    rendezvous); None: --standalone on one node."""
    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one device for MFU; None = looked up for known GPUs, no MFU on CPU."""
    in_process: bool = False
    """Train inside the calling process instead of a subprocess (tests, debugging; nproc must be 1)."""

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if isinstance(value, str):  # YAML / CLI overrides: auto, true/false, yes/no, on/off, 1/0
            text = value.strip().lower()
            flags = {"true": True, "yes": True, "on": True, "1": True,
                     "false": False, "no": False, "off": False, "0": False}
            if text in flags:
                return flags[text]
            if text == "auto":
                return "auto"
            raise ValueError(f"train.compile must be auto, true or false, got {value!r}")
        return value

    @field_validator("max_time", "max_cpu_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @property
    def budgeted(self) -> bool:
        """True when the run's length is a time budget rather than a step count."""
        return bool(self.max_time or self.max_cpu_time)

    @model_validator(mode="after")
    def _train_shape(self) -> TrainConfig:
        if self.in_process and (self.nproc != 1 or self.nnodes != 1):
            raise ValueError("train.in_process needs train.nproc = 1 and train.nnodes = 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.nnodes = {self.nnodes} needs train.rdzv_endpoint (host:port)")
        if self.micro_batch_size is not None and self.batch_tokens is None \
                and self.batch_size % (self.micro_batch_size * self.nproc * self.nnodes):
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"* nproc * nnodes ({self.micro_batch_size} * {self.nproc} * {self.nnodes})")
        return self


class EvalTaskConfig(Section):
    """One zero-shot/few-shot evaluation task over a local file (formats in tasks/evaluate/evals/)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    """Task name; its metrics are logged as `<name>.<metric>`."""
    kind: Literal["perplexity", "cloze", "choice", "sst2", "rte", "boolq", "copa"]
    """perplexity: text file(s) scored like lm-eval's WikiText; cloze: LAMBADA-style last word;
    choice: generic multiple choice; sst2/rte/boolq/copa: those datasets' published JSONL layouts."""
    path: str
    """Local file: .txt or .jsonl (perplexity), .jsonl (the others)."""
    text_field: str = "text"
    """JSONL field holding the text (perplexity over .jsonl, cloze)."""
    separator: str | None = None
    """Split a .txt file into documents at this string (None: the file is one document)."""
    stride: int | None = Field(default=None, gt=0)
    """Perplexity window stride in tokens (None: disjoint windows of the full context)."""
    limit: int | None = Field(default=None, gt=0)
    """Score only the first N examples."""
    num_fewshot: int = Field(default=0, ge=0)
    """Solved examples prepended to each prompt (choice kinds)."""
    fewshot_path: str | None = None
    """Where few-shot examples come from (None: the other examples of the same file)."""
    fewshot_seed: int = 1234
    """Seed for drawing few-shot examples."""


class EvalConfig(Section):
    max_batches: int | None = Field(default=None, gt=0)
    """Cap on validation batches (None = the whole validation split)."""
    batch_size: int = Field(default=16, gt=0)
    """Rows per evaluation batch."""
    samples: int = Field(default=3, ge=0)
    """How many text samples to generate."""
    sample_tokens: int = Field(default=64, gt=0)
    """Length of each generated sample in tokens."""
    prompts: list[str] = Field(default_factory=lambda: ["def ", "import ", "class "])
    """Prompts for the generated samples (cycled)."""
    tasks: list[EvalTaskConfig] = Field(default_factory=list)
    """Extra evaluation tasks on local files (perplexity, cloze, multiple choice, GLUE-style)."""
    contamination_ngram: int = Field(default=13, ge=4)
    """Word n-gram length for the train/test overlap check (GPT-3 used 13)."""
    contamination_max_tokens: int = Field(default=20_000_000, gt=0)
    """At most this many training tokens are indexed for the overlap check."""

    @model_validator(mode="after")
    def _unique_task_names(self) -> EvalConfig:
        names = [t.name for t in self.tasks]
        if len(names) != len(set(names)):
            raise ValueError(f"eval task names must be unique, got {names}")
        return self


class RegistryConfig(Section):
    model_name: str = Field(default="gpt-neo-tiny", pattern=r"^[A-Za-z0-9_.-]+$")
    """Registered model name in the MLflow model registry."""
    metric: str = "val_bpb"
    """Evaluation metric recorded as a tag on every version (shown by `neo models`)."""
    margin: float = Field(default=0.0, ge=0.0)
    """The candidate becomes `champion` only if its bits-per-byte is lower than the champion's by
    more than this, both scored on the candidate's validation text; otherwise it is `challenger`."""
    gate_max_bytes: int = Field(default=100_000, gt=0)
    """How much validation text (UTF-8 bytes) the gate scores both models on."""
    ui_url: str = "http://127.0.0.1:5000"
    """MLflow UI base URL for links when tracking is embedded (a server's own URL is used otherwise)."""
