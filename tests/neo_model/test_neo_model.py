"""Tests for neo_model.model: attention window, init scheme, loss, generation, a short training run."""

import math

import pytest
import torch
import torch.nn.functional as F

from neo_model import GPTNeo, GPTNeoConfig
from neo_model.model import attention_mask


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTNeo(GPTNeoConfig.from_preset("debug", **overrides)).eval()


def test_attention_mask_matches_definition():
    W, T = 4, 10
    mask = attention_mask(0, T, T, W)
    for i in range(T):
        for j in range(T):
            assert bool(mask[i, j]) == (j <= i and i - j < W)
    # Decoding rows (queries at the end) are the last rows of the full mask.
    assert torch.equal(attention_mask(7, 3, T, W), mask[7:])
    assert torch.equal(attention_mask(0, T, T, None), torch.ones(T, T).tril().bool())


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "flex"])
def test_local_layer_ignores_tokens_beyond_window_global_does_not(backend):
    model = small_model(window_size=4)
    model.attn_backend = backend
    global_block, local_block = model.transformer.h[0], model.transformer.h[1]
    assert (global_block.attention_type, local_block.attention_type) == ("global", "local")
    T, W, i = 12, 4, 10
    x = torch.randn(1, T, 64)
    x_far = x.clone()
    x_far[0, i - W] = torch.randn(64)  # exactly one step outside the window of query i
    x_near = x.clone()
    x_near[0, i - W + 1] = torch.randn(64)  # the oldest key still inside the window
    with torch.no_grad():  # flex runs on CPU only without autograd
        plan = model._plan(T, x.device, None, decode=False)
        assert plan.local_impl == backend
        local = local_block(x, plan)
        assert torch.allclose(local_block(x_far, plan)[0, i], local[0, i], atol=1e-6)
        assert (local_block(x_near, plan)[0, i] - local[0, i]).abs().max() > 1e-3
        glob = global_block(x, plan)
        assert (global_block(x_far, plan)[0, i] - glob[0, i]).abs().max() > 1e-3


def test_init_std_per_group_follows_mesh_tf_scheme():
    torch.manual_seed(0)
    c = GPTNeoConfig(vocab_size=4096, max_position_embeddings=1024, hidden_size=256, num_layers=4,
                     num_heads=4, window_size=64, eos_token_id=0, bos_token_id=0)
    model = GPTNeo(c)
    d, hs, L = 256, 64, 4
    expected = {
        "wte": 0.02, "wpe": 0.01, "q_proj": d ** -0.5 * hs ** -0.5, "k_proj": d ** -0.5, "v_proj": d ** -0.5,
        "out_proj": d ** -0.5, "c_fc": 0.02, "c_proj": 0.02 / math.sqrt(L),
    }
    groups = {k: [] for k in expected}
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(p == 1), name
        else:
            groups[name.split(".")[-2]].append(p.detach().flatten())
    for key, std in expected.items():
        measured = torch.cat(groups[key]).std().item()
        assert abs(measured / std - 1) < 0.05, (key, measured, std)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_attention_logits_are_order_one_at_init():
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig(vocab_size=4096, max_position_embeddings=256, hidden_size=256, num_layers=4,
                                num_heads=4, window_size=64, eos_token_id=0, bos_token_id=0))
    captured = []
    for block in model.transformer.h:
        block.ln_1.register_forward_hook(lambda mod, inp, out, blk=block: captured.append((blk, out)))
    with torch.no_grad():
        model(torch.randint(0, 4096, (2, 128)))
        for block, h in captured:
            attn = block.attn.attention
            B, T, _ = h.shape
            q = attn.q_proj(h).view(B, T, 4, 64).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, 4, 64).transpose(1, 2)
            std = (q @ k.transpose(-1, -2)).std().item()  # unscaled scores, as the model uses them
            assert 0.3 < std < 3.0, std


def test_loss_reductions_and_initial_loss_near_uniform():
    model = small_model()
    ids = torch.randint(0, 512, (2, 32))
    targets = torch.randint(0, 512, (2, 32))
    targets[0, :5] = -100
    logits, loss = model(ids, targets)
    assert logits.shape == (2, 32, 512)
    manual = F.cross_entropy(logits.view(-1, 512), targets.view(-1), ignore_index=-100)
    assert torch.allclose(loss, manual)
    nll = model.token_nll(ids, targets)
    assert nll.shape == (2, 32) and torch.all(nll[0, :5] == 0)
    assert torch.allclose(nll.sum() / (targets != -100).sum(), loss)
    assert abs(loss.item() - math.log(512)) < 0.1  # small init logits: close to the uniform distribution
    assert model(ids)[1] is None
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_debug_preset_learns_a_pattern_in_seconds():
    model = small_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(65).remainder(7).repeat(8, 1)  # period-7 sequence: easy to predict
    losses = []
    for _ in range(40):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.5 and losses[-1] < 0.5


def test_generate_is_deterministic_with_seeded_generator():
    model = small_model()
    prompt = torch.randint(0, 512, (2, 5))
    out = [model.generate(prompt, 30, top_k=50, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert out[0].shape == (2, 35) and torch.equal(out[0], out[1])
    assert torch.equal(out[0][:, :5], prompt)
    other = model.generate(prompt, 30, top_k=50, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, out[0])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kv_cache_matches_full_recompute_including_crop(temperature):
    # 100 prompt + 60 new > 128 positions: covers the cached path, local windows (16) and cropping.
    model = small_model()
    prompt = torch.randint(0, 512, (2, 100))
    runs = [model.generate(prompt, 60, temperature=temperature, generator=torch.Generator().manual_seed(1),
                           use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0].shape == (2, 160)
    assert torch.equal(runs[0], runs[1])


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = small_model()
    prompt = torch.randint(0, 512, (1, 4))
    free = model.generate(prompt, 10, temperature=0.0)
    eos = int(free[0, 4])  # the first greedy token
    stopped = model.generate(prompt, 10, temperature=0.0, eos_token_id=eos)
    assert stopped.shape == (1, 5) and int(stopped[0, -1]) == eos
    # Two rows: the finished row keeps emitting eos while the other continues.
    batch = torch.cat([prompt, torch.randint(0, 512, (1, 4))])
    out = model.generate(batch, 10, temperature=0.0, eos_token_id=eos)
    assert torch.all(out[0, 4:] == eos)
    assert model.training is False
