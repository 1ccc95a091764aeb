"""PipelineConfig: one validated pydantic model with a section per stage.

Loaded from a YAML preset in `configs/`, overridden by `--set section.key=value`. Every field has a
docstring (shown in the Prefect run form); a wrong key or value raises `ConfigError` naming the key
before any stage starts. This module imports neither Prefect nor torch, so the CLI can validate a
config (and set up the embedded Prefect home) before those heavy imports happen.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the dotted key that caused it."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class CorpusConfig(Section):
    sources: list[str] = Field(default_factory=lambda: ["python-stdlib"], min_length=1)
    """Where the documents come from: directories, files or globs of .txt/.py/.md/.jsonl/.jsonl.zst,
    or `python-stdlib` for the Python standard library sources of the running interpreter."""
    max_bytes: int | None = Field(default=8_000_000, gt=0)
    """Stop taking source files once this many bytes were read (None = no cap)."""
    shard_bytes: int = Field(default=16_000_000, gt=0)
    """Target uncompressed size of one raw jsonl.zst shard."""
    text_field: str = "text"
    """Field holding the document text in .jsonl sources."""


class CleanConfig(Section):
    min_chars: int = Field(default=64, ge=0)
    """Documents shorter than this (after repair) are rejected as `too_short`."""
    max_chars: int = Field(default=1_000_000, gt=0)
    """Documents longer than this are rejected as `too_long`."""
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalization form. NFC only merges canonically equivalent sequences (it does fold a
    few compatibility characters such as the Kelvin sign into letters); NFKC folds much more."""

    @model_validator(mode="after")
    def _bounds(self) -> CleanConfig:
        if self.max_chars <= self.min_chars:
            raise ValueError("max_chars must be greater than min_chars")
        return self


class DedupConfig(Section):
    normalize_whitespace: bool = True
    """Collapse runs of whitespace before hashing, so re-indented copies count as duplicates."""
    lowercase: bool = False
    """Lowercase before hashing (off: case matters in code)."""


class TokenizerConfig(Section):
    vocab_size: int = Field(default=4096, ge=260, le=65536)
    """Size of the trained byte-level BPE vocabulary (256 bytes + merges + `<|endoftext|>`)."""
    seq_len: int = Field(default=256, ge=8)
    """Context length of a packed training row (rows hold seq_len + 1 tokens: inputs and targets)."""
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    """Share of documents (chosen by a hash of the document id) held out for validation."""
    train_sample_bytes: int = Field(default=50_000_000, gt=0)
    """At most this many bytes of text are used to train the BPE merges."""
    rows_per_file: int = Field(default=8192, gt=0)
    """Packed rows per Parquet file."""


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
    """torch CPU threads (None = torch default)."""
    experiment: str = "neo-pipeline"
    """MLflow experiment the training run is recorded in."""


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


class RegistryConfig(Section):
    model_name: str = "gpt-neo-tiny"
    """Registered model name in the MLflow model registry."""
    metric: str = "val_bpb"
    """Metric that decides promotion (lower is better)."""
    champion_alias: str = "champion"
    """Alias given to a version that beats the current champion."""
    challenger_alias: str = "challenger"
    """Alias given to a version that does not."""


class PipelineConfig(Section):
    """The whole pipeline: one section per stage."""

    name: str = Field(default="tiny", pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of this configuration (shown in run names)."""
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> PipelineConfig:
        max_pos = self.model.overrides.get("max_position_embeddings")
        if max_pos is not None and self.tokenizer.seq_len > int(max_pos):
            raise ValueError(
                f"tokenizer.seq_len ({self.tokenizer.seq_len}) exceeds "
                f"model.overrides.max_position_embeddings ({max_pos})"
            )
        return self


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{prefix}{key}: {e['msg']}")
    return "invalid config: " + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def _apply(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def load_config(preset: str | Path = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Preset YAML (a name in configs/ or a path) + `section.key=value` overrides -> PipelineConfig."""
    named = CONFIG_DIR / f"{preset}.yaml"
    path = named if named.is_file() else Path(preset)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config preset {str(preset)!r} not found (known presets: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        keys, value = parse_override(item)
        _apply(data, keys, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


_SECRET_KEY = re.compile(r"(password|secret|api_key|access_key|credential|auth_token)", re.I)


def redacted_params(cfg: PipelineConfig) -> dict[str, str]:
    """The whole config flattened to `section.key -> str` for MLflow params, secrets masked."""
    out: dict[str, str] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(f"{prefix}{name}.", getattr(obj, name))
            return
        key = prefix.rstrip(".")
        if isinstance(obj, SecretStr) or _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            out[key] = "***"
        elif isinstance(obj, (dict, list)):
            out[key] = json.dumps(obj, sort_keys=True, default=str)
        else:
            out[key] = str(obj)

    walk("", cfg)
    return out


def default_workspace() -> Path:
    """`$NEO_HOME`, else `./.neo` in the current directory."""
    return Path(os.environ.get("NEO_HOME") or Path.cwd() / ".neo").resolve()
