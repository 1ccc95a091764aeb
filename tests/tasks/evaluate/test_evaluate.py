"""Evaluate stage math: bits-per-byte, the unigram baseline, the model's per-row NLL."""
import math

import numpy as np
import pytest
import torch

from neo_model import GPTNeo, GPTNeoConfig
from tasks.evaluate.stage import model_nll, summarize, unigram_nll


def test_summarize_bits_per_byte_and_perplexity():
    nll = np.array([4.0, 6.0])  # nats per row, 5 target tokens in all, 20 bytes
    m = summarize(nll, np.array([8, 12]), n_tokens=5)
    assert m["loss"] == pytest.approx(2.0)
    assert m["ppl"] == pytest.approx(math.exp(2.0))
    assert m["bpb"] == pytest.approx(10.0 / math.log(2) / 20)


def test_unigram_baseline_is_add_one_smoothed_train_frequencies():
    train = np.array([[9, 0, 0, 1]])  # targets 0, 0, 1 (the first column is never a target)
    val = np.array([[9, 1, 2]])  # targets 1, 2
    vocab = 3
    p = np.array([2 + 1, 1 + 1, 0 + 1]) / (3 + vocab)
    expected = -(math.log(p[1]) + math.log(p[2]))
    assert unigram_nll(train, val, vocab) == pytest.approx([expected])


def test_model_nll_matches_log_softmax_of_logits():
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig.from_preset("debug"))
    rows = np.random.default_rng(0).integers(0, 512, size=(5, 17))
    got = model_nll(model, rows, batch_size=2, max_batches=None)
    x = torch.from_numpy(rows)
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    logp = torch.log_softmax(logits.double(), dim=-1)
    want = -logp.gather(-1, x[:, 1:, None]).squeeze(-1).sum(dim=1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    assert model_nll(model, rows, batch_size=2, max_batches=1).shape == (2,)
