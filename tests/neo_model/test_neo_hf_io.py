"""Tests for neo_model.hf_io: logits parity with transformers in both directions, loading errors."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from neo_model import GPTNeo, GPTNeoConfig, load_pretrained, save_pretrained

# Small random shape; T = 40 > window 8, so local layers see a different context than global ones.
CFG = dict(vocab_size=512, max_position_embeddings=96, hidden_size=64, num_layers=4, num_heads=4, window_size=8,
           bos_token_id=511, eos_token_id=511)
T = 40


def perturb_(model, seed):
    """Add noise to every tensor so biases and LayerNorm affine terms are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def hf_eager(path):
    model, info = transformers.GPTNeoForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(0))


def test_ours_saved_then_loaded_by_transformers(tmp_path, ids):
    torch.manual_seed(0)
    ours = GPTNeo(GPTNeoConfig(**CFG)).eval()
    perturb_(ours, 1)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    hf = hf_eager(tmp_path)
    assert torch.equal(hf.lm_head.weight, ours.transformer.wte.weight)
    with torch.no_grad():
        logits, _ = ours(ids)
        out = hf(ids, labels=ids)
    assert (logits - out.logits).abs().max().item() < 1e-4
    # HF shifts labels internally; our targets are already shifted, with -100 at the last position.
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    assert abs(ours(ids, targets)[1].item() - out.loss.item()) < 1e-5


def test_transformers_saved_then_loaded_by_us(tmp_path, ids):
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoConfig(**CFG, attention_types=[[["global", "local"], 2]])
    hf = transformers.GPTNeoForCausalLM(hf_config).eval()
    perturb_(hf, 2)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = load_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.config.attention_layers == ["global", "local"] * 2
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids)[0] - ref).abs().max().item() < 1e-4
        # The window matters at this length: a model with an all-covering window disagrees.
        ours.config.window_size = T
        assert (ours(ids)[0] - ref).abs().max().item() > 1e-3


def test_greedy_generation_matches_transformers_generate(tmp_path, ids):
    # Our KV-cache decoding (with local windows and positions past the window) against HF's own cache.
    torch.manual_seed(0)
    ours = GPTNeo(GPTNeoConfig(**CFG)).eval()
    perturb_(ours, 4)
    ours.save_pretrained(tmp_path)
    hf = hf_eager(tmp_path)
    prompt = ids[:, :10]
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 30, temperature=0.0), ref)


def test_legacy_bin_with_mask_buffers_loads(tmp_path, ids):
    torch.manual_seed(0)
    src = GPTNeo(GPTNeoConfig(**CFG)).eval()
    perturb_(src, 3)
    state = dict(src.state_dict())
    state["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, 96, 96, dtype=torch.bool).tril()
    state["transformer.h.0.attn.attention.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(src.config.to_hf_dict()))
    loaded = GPTNeo.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], src(ids)[0])


def test_round_trip_keeps_dtype_and_config(tmp_path):
    src = GPTNeo(GPTNeoConfig.from_preset("debug", num_layers=3)).to(torch.bfloat16)
    save_pretrained(src, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == src.config
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_pretrained(tmp_path, dtype=torch.float32).transformer.wte.weight.dtype == torch.float32


@pytest.fixture
def saved(tmp_path):
    save_pretrained(GPTNeo(GPTNeoConfig.from_preset("debug")), tmp_path)
    return tmp_path


def _edit_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    _edit_weights(saved, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing keys.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_pretrained(saved)


def test_unexpected_key_is_named(saved):
    _edit_weights(saved, lambda s: s.update({"transformer.h.0.attn.attention.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected keys.*q_proj\.bias"):
        load_pretrained(saved)


def test_shape_mismatch_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["vocab_size"] = 1000
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for transformer\.wte\.weight"):
        load_pretrained(saved)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(GPTNeoConfig.from_preset("debug").to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_untied_head_copy_equal_to_wte_loads_and_a_different_one_is_refused(saved):
    # Released GPT-Neo checkpoints carry lm_head.weight as a copy of wte.
    _edit_weights(saved, lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"].clone()}))
    model = load_pretrained(saved)
    assert model.lm_head.weight is model.transformer.wte.weight
    _edit_weights(saved, lambda s: s["lm_head.weight"].add_(1e-3))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_pretrained(saved)


def test_sharded_save_is_read_by_us_and_by_transformers(tmp_path, ids):
    torch.manual_seed(0)
    ours = GPTNeo(GPTNeoConfig(**CFG)).eval()
    perturb_(ours, 5)
    ours.save_pretrained(tmp_path, max_shard_size=200_000)  # ~0.9 MB of fp32 weights -> several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = {k: v for s in shards for k, v in load_file(tmp_path / s).items()}
    assert set(tensors) == set(index["weight_map"]) and "lm_head.weight" not in tensors
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with torch.no_grad():
        expected = ours(ids)[0]
        assert torch.equal(load_pretrained(tmp_path)(ids)[0], expected)
        assert (hf_eager(tmp_path)(ids).logits - expected).abs().max().item() < 1e-4
    # Saving again below the threshold replaces the shards with a single file.
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_sharded_checkpoint_written_by_transformers_loads(tmp_path, ids):
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoConfig(**CFG, attention_types=[[["global", "local"], 2]])
    hf = transformers.GPTNeoForCausalLM(hf_config).eval()
    perturb_(hf, 6)
    hf.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4
