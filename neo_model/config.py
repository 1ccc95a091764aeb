"""GPT-Neo model configuration.

`GPTNeoConfig` mirrors the field names of `transformers.GPTNeoConfig`, so a `config.json` written here is
read by `GPTNeoForCausalLM.from_pretrained` and vice versa. `PRESETS` holds the published EleutherAI
shapes (125M, 1.3B, 2.7B) plus two small shapes for CPU tests and demos.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

# Activations this implementation knows; "gelu_new" (tanh approximation) is what GPT-Neo uses.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
ATTENTION_KINDS = ("global", "local")


def alternating_attention_types(num_layers: int) -> list:
    """HF-style `attention_types` for global, local, global, ... over `num_layers` layers."""
    types: list = []
    if num_layers // 2:
        types.append([["global", "local"], num_layers // 2])
    if num_layers % 2:
        types.append([["global"], 1])
    return types


@dataclass
class GPTNeoConfig:
    """Shape and regularisation of a GPT-Neo model (field names follow `transformers.GPTNeoConfig`)."""

    vocab_size: int = 50257
    """Token vocabulary size (GPT-2 BPE)."""
    max_position_embeddings: int = 2048
    """Rows of the learned position table, i.e. the longest context."""
    hidden_size: int = 768
    """Residual stream width d."""
    num_layers: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block; head dim = hidden_size / num_heads."""
    attention_types: list | None = None
    """HF format `[[["global", "local"], n], ...]`; None means alternate global/local over num_layers."""
    window_size: int = 256
    """Keys visible to a query in a local layer, itself included."""
    intermediate_size: int | None = None
    """MLP inner width; None means 4 * hidden_size (as in HF)."""
    activation_function: str = "gelu_new"
    """MLP non-linearity; gelu_new is GELU with the tanh approximation."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon, used by every LayerNorm."""
    embed_dropout: float = 0.0
    """Dropout on token + position embeddings."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    resid_dropout: float = 0.0
    """Dropout on the attention and MLP outputs before the residual add."""
    initializer_range: float = 0.02
    """Base init std (wte, c_fc); the other groups are derived from it, see GPTNeo._init_weights."""
    bos_token_id: int | None = 50256
    """Beginning-of-sequence id (<|endoftext|>, the last id of GPT-2 BPE)."""
    eos_token_id: int | None = 50256
    """End-of-sequence id (<|endoftext|>, the last id of GPT-2 BPE)."""
    trained_context: int | None = None
    """Tokens per sequence the model was trained at (written by the train stage; transformers keeps it
    as an extra attribute). Evaluation windows use it; None: max_position_embeddings."""

    def __post_init__(self) -> None:
        if self.attention_types is None:
            self.attention_types = alternating_attention_types(self.num_layers)
        # Normalise tuples (e.g. from YAML or HF) into lists so equality and JSON round trips are exact.
        self.attention_types = [[list(kinds), int(n)] for kinds, n in self.attention_types]
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "num_heads",
                     "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be positive or None, got {self.intermediate_size!r}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"activation_function must be one of {SUPPORTED_ACTIVATIONS}, "
                             f"got {self.activation_function!r}")
        for name in ("embed_dropout", "attention_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must be a token id below vocab_size ({self.vocab_size})")
        if self.trained_context is not None and not 0 < self.trained_context <= self.max_position_embeddings:
            raise ValueError(f"trained_context ({self.trained_context}) must be in 1..max_position_embeddings "
                             f"({self.max_position_embeddings})")
        bad = sorted({k for k in self.attention_layers if k not in ATTENTION_KINDS})
        if bad:
            raise ValueError(f"attention_types may only contain {ATTENTION_KINDS}, got {bad}")
        if len(self.attention_layers) != self.num_layers:
            raise ValueError(
                f"attention_types expands to {len(self.attention_layers)} layers but num_layers is "
                f"{self.num_layers}; fix attention_types or leave it None to alternate global/local")

    # ---- derived quantities -------------------------------------------------------------------------

    @property
    def attention_layers(self) -> list[str]:
        """Per-layer attention kind, e.g. ["global", "local", "global", ...] (HF expansion order)."""
        layers: list[str] = []
        for kinds, repeat in self.attention_types:
            for _ in range(repeat):
                layers.extend(kinds)
        return layers

    @property
    def context(self) -> int:
        """The longest context to score with: the trained context, else every position."""
        return self.trained_context or self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def inner_size(self) -> int:
        """MLP hidden width (intermediate_size, defaulting to 4 * hidden_size)."""
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size

    # ---- HF config.json interop ---------------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """A dict that `transformers.GPTNeoConfig(**d)` and `from_pretrained` accept as config.json."""
        d: dict[str, Any] = {"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo"}
        for f in fields(self):
            d[f.name] = copy.deepcopy(getattr(self, f.name))
        # Our lm_head always shares the token embedding matrix.
        d["tie_word_embeddings"] = True
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "GPTNeoConfig":
        """Build from a config.json dict (ours or HF's); keys we do not model are ignored."""
        if d.get("model_type", "gpt_neo") != "gpt_neo":
            raise ValueError(f"model_type must be 'gpt_neo', got {d.get('model_type')!r}")
        if d.get("tie_word_embeddings", True) is False:
            raise ValueError("tie_word_embeddings=False is not supported: GPTNeo ties lm_head to wte")
        known = {f.name for f in fields(cls)}
        kwargs = {k: copy.deepcopy(v) for k, v in d.items() if k in known}
        # HF allows a list of eos ids; we keep one (the first), which is what GPT-Neo uses.
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    # ---- presets ------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTNeoConfig":
        """A preset shape with field overrides.

        Overriding num_layers re-derives attention_types. Overriding vocab_size below the preset's
        bos/eos ids (and not the ids themselves) moves them to the new last id, GPT-2 BPE's convention
        for <|endoftext|>; pass the ids explicitly when the tokenizer puts them elsewhere.
        """
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTNeoConfig field(s) in overrides: {sorted(unknown)}")
        kwargs = {**PRESETS[key], **overrides}
        if "num_layers" in overrides and "attention_types" not in overrides:
            kwargs["attention_types"] = None  # regenerate global/local alternation for the new depth
        for id_field in ("bos_token_id", "eos_token_id"):
            token = kwargs.get(id_field, 50256)
            if id_field not in overrides and token is not None and token >= kwargs.get("vocab_size", 50257):
                kwargs[id_field] = kwargs["vocab_size"] - 1
        return cls(**kwargs)


# Field values per preset (anything not listed keeps the dataclass default). The three large shapes are
# EleutherAI's released GPT-Neo models; "debug" trains in seconds on CPU, "tiny" is a CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16),
    "2.7b": dict(hidden_size=2560, num_layers=32, num_heads=20),
    "debug": dict(vocab_size=512, max_position_embeddings=128, hidden_size=64, num_layers=2, num_heads=4,
                  window_size=16, bos_token_id=511, eos_token_id=511),
    "tiny": dict(vocab_size=4096, max_position_embeddings=256, hidden_size=128, num_layers=4, num_heads=4,
                 window_size=64, bos_token_id=4095, eos_token_id=4095),
}
