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
from typing import Any

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator

from tasks.core.data_config import CleanConfig, CorpusConfig, DedupConfig, TokenizerConfig
from tasks.core.run_params import scrub_flow_run_parameters
from tasks.core.section import Section
from tasks.core.train_config import EvalConfig, ModelConfig, RegistryConfig, TrainConfig
from tasks.core.urls import redact

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the dotted key that caused it."""


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
    data = _preset_data(preset)
    for item in overrides:
        keys, value = parse_override(item)
        _apply(data, keys, value)
    return _validate(data)


def resolve_config(config: PipelineConfig | None = None, preset: str | None = None,
                   overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """What a flow run runs: the `preset` (a name in configs/ or a YAML path), or else `config`,
    with `overrides` ({"train.max_steps": 800}, values already typed) applied; validated like
    `neo run --set`, with the same errors. Deployment parameters use this, so `preset: debug` runs
    the debug preset instead of defaults labelled "debug"."""
    scrub_flow_run_parameters()  # secrets typed into a run's parameters are masked in Prefect's DB
    if preset is not None:
        data = _preset_data(preset)
    else:
        data = (config or PipelineConfig()).model_dump()  # python mode: secrets stay SecretStr
        if not overrides:
            return config or PipelineConfig()
    for key, value in (overrides or {}).items():
        path = [p for p in str(key).split(".") if p]
        if not path:
            raise ConfigError(f"override {key!r} has an empty key")
        _apply(data, path, value)
    return _validate(data)


def _preset_data(preset: str | Path) -> dict:
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
    return data


def _validate(data: dict) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


_SECRET_KEY = re.compile(r"(password|secret|api_key|access_key|credential|auth_token)", re.I)


def _json_default(obj: Any) -> Any:
    # A SourceSpec in `corpus.sources` as its JSON form (SecretStr fields come out as `**********`).
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else str(obj)


def redacted_params(cfg: PipelineConfig) -> dict[str, str]:
    """The whole config flattened to `section.key -> str` for MLflow params, secrets masked: secret
    fields as `***`, and every value through `tasks.core.urls.redact` (URL userinfo, signed-URL
    tokens and signatures)."""
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
            out[key] = redact(json.dumps(obj, sort_keys=True, default=_json_default))
        else:
            out[key] = redact(str(obj))

    walk("", cfg)
    return out


def default_workspace() -> Path:
    """`$NEO_HOME`, else `./.neo` in the current directory."""
    return Path(os.environ.get("NEO_HOME") or Path.cwd() / ".neo").resolve()
