"""Tests for neo_model.config: layer expansion, validation, presets, HF config.json interop."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

from neo_model import PRESETS, GPTNeo, GPTNeoConfig


def test_defaults_match_gpt_neo_125m_layout():
    c = GPTNeoConfig()
    assert c.attention_types == [[["global", "local"], 6]]
    assert c.attention_layers == ["global", "local"] * 6
    assert (c.vocab_size, c.max_position_embeddings, c.window_size) == (50257, 2048, 256)
    assert c.inner_size == 4 * 768 and c.head_dim == 64


def test_num_layers_override_regenerates_alternation():
    c = GPTNeoConfig.from_preset("125m", num_layers=5, vocab_size=1000, window_size=32)
    assert c.attention_layers == ["global", "local", "global", "local", "global"]
    assert (c.vocab_size, c.window_size, c.hidden_size) == (1000, 32, 768)
    # A plain constructor call with a different depth also gets a matching alternation.
    assert GPTNeoConfig(num_layers=3).attention_layers == ["global", "local", "global"]


def test_vocab_override_keeps_special_ids_in_range():
    c = GPTNeoConfig.from_preset("125m", vocab_size=8192)
    assert (c.bos_token_id, c.eos_token_id) == (8191, 8191)
    c = GPTNeoConfig.from_preset("125m", vocab_size=8192, eos_token_id=3)
    assert (c.bos_token_id, c.eos_token_id) == (8191, 3)
    assert GPTNeoConfig.from_preset("125m").eos_token_id == 50256


def test_preset_names_and_shapes():
    assert {"125m", "1.3b", "2.7b", "debug", "tiny"} <= set(PRESETS)
    assert GPTNeoConfig.from_preset("1.3B").hidden_size == 2048  # case-insensitive
    debug = GPTNeoConfig.from_preset("debug")
    assert debug.max_position_embeddings > debug.window_size  # so local layers differ from global


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=100, num_heads=12), "hidden_size"),
    (dict(num_layers=4, attention_types=[[["global", "local"], 6]]), "attention_types"),
    (dict(attention_types=[[["global", "sparse"], 6]]), "attention_types"),
    (dict(activation_function="swish42"), "activation_function"),
    (dict(window_size=0), "window_size"),
    (dict(resid_dropout=1.5), "resid_dropout"),
    (dict(vocab_size=1000, bos_token_id=0), "eos_token_id"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTNeoConfig(**kwargs)


def test_unknown_preset_and_override_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        GPTNeoConfig.from_preset("6b")
    with pytest.raises(ValueError, match="n_embd"):
        GPTNeoConfig.from_preset("debug", n_embd=64)


# Published parameter counts with the tied head (REFERENCE.md section 1).
@pytest.mark.parametrize("name, count", [
    ("125m", 125_198_592), ("1.3b", 1_315_575_808), ("2.7b", 2_651_307_520),
])
def test_published_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: no memory is allocated for 2.7B weights
        model = GPTNeo(GPTNeoConfig.from_preset(name))
    assert model.num_parameters() == count
    c = model.config
    assert model.num_parameters(exclude_positions=True) == count - c.max_position_embeddings * c.hidden_size


def test_flops_per_token_uses_window_for_local_layers():
    with torch.device("meta"):
        model = GPTNeo(GPTNeoConfig.from_preset("125m"))
    n = 125_198_592 - 2048 * 768
    expected = 6 * n + 12 * 12 * 64 * (6 * 2048 + 6 * 256)  # 6 global layers see T, 6 local see 256
    assert model.flops_per_token(2048) == expected
    # Below the window every layer sees the whole context.
    assert model.flops_per_token(128) == 6 * n + 12 * 12 * 12 * 64 * 128


def test_hf_config_round_trip(tmp_path):
    ours = GPTNeoConfig.from_preset("debug", num_layers=3, embed_dropout=0.1)
    d = ours.to_hf_dict()
    assert d["model_type"] == "gpt_neo" and d["architectures"] == ["GPTNeoForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.GPTNeoConfig)
    assert hf.attention_layers == ours.attention_layers
    assert (hf.hidden_size, hf.num_layers, hf.num_heads, hf.window_size, hf.vocab_size) == (
        64, 3, 4, 16, 512)
    assert hf.embed_dropout == 0.1
    # Back from HF's own serialisation, which carries many keys we do not model.
    assert GPTNeoConfig.from_hf_dict(hf.to_dict()) == ours
