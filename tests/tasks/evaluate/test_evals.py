"""Evaluation tasks against log-likelihoods computed directly from the model's logits."""
import json
import math
import re

import pytest
import torch

from neo_model import GPTNeo, GPTNeoConfig
from tasks.core.train_config import EvalTaskConfig
from tasks.evaluate.evals import run_task
from tasks.evaluate.evals.choice import examples
from tasks.evaluate.evals.cloze import split_last_word
from tasks.evaluate.evals.contamination import contaminated_fraction, training_index
from tasks.evaluate.evals.scoring import continuation_loglik, rolling_nll
from tasks.tokenize.bpe import train_tokenizer

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. "
        "A bird sang in the tall green tree while the sun rose over the hills. ") * 4


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT] * 3, 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = GPTNeoConfig.from_preset("debug", vocab_size=tok.get_vocab_size(), max_position_embeddings=64,
                                   window_size=8, eos_token_id=0, bos_token_id=0)
    return GPTNeo(cfg).eval()


def direct_loglik(model, ctx: list[int], cont: list[int]) -> float:
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = model(seq[:, :-1])
    logp = torch.log_softmax(logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_continuation_loglik_matches_direct(model, tok):
    reqs = [(tok.encode("The cat").ids, tok.encode(" sat on").ids),
            (tok.encode("A bird sang in the").ids, tok.encode(" tree").ids)]
    got = continuation_loglik(model, reqs, batch_size=2)
    for (ctx, cont), (ll, _) in zip(reqs, got):
        assert ll == pytest.approx(direct_loglik(model, ctx, cont), abs=1e-4)


def test_rolling_nll_single_window_equals_direct_and_strided(model, tok):
    ids = tok.encode("The dog ran to the park and back again.").ids
    assert len(ids) + 1 <= model.config.max_position_embeddings
    direct = -direct_loglik(model, [0], ids)
    assert rolling_nll(model, ids, eos_id=0) == pytest.approx(direct, abs=1e-4)
    assert rolling_nll(model, ids, eos_id=0, stride=3) == pytest.approx(direct, abs=1e-4)


def test_rolling_nll_long_text_scores_every_token_once(model, tok):
    ids = tok.encode(TEXT * 2).ids
    M = model.config.max_position_embeddings
    assert len(ids) > 2 * M
    # Disjoint windows by hand: window w predicts tokens [w*M, (w+1)*M) of [eos] + ids.
    tokens = [0] + ids
    want, scored = 0.0, 1
    while scored < len(tokens):
        end = min(scored + M, len(tokens))
        begin = max(0, end - M - 1)
        ctx, cont = tokens[begin:scored], tokens[scored:end]
        want -= direct_loglik(model, ctx, cont)
        scored = end
    assert rolling_nll(model, ids, eos_id=0) == pytest.approx(want, abs=1e-3)
    assert rolling_nll(model, ids, eos_id=0, stride=8) != pytest.approx(want, abs=1e-3)


def test_rolling_nll_batched_windows_equal_one_at_a_time(model, tok):
    ids = tok.encode(TEXT * 2).ids
    for stride in (None, 8):
        one = rolling_nll(model, ids, eos_id=0, stride=stride, batch_size=1)
        assert rolling_nll(model, ids, eos_id=0, stride=stride, batch_size=16) == pytest.approx(one, rel=1e-6)


def test_windows_are_the_trained_context_not_every_position(model, tok, tmp_path):
    """A model trained on 16-token rows is scored in 16-token windows (its later positions never
    learned anything), and the perplexity task says which window it used."""
    short = GPTNeo(GPTNeoConfig.from_hf_dict({**model.config.to_hf_dict(), "trained_context": 16})).eval()
    short.load_state_dict(model.state_dict())
    ids = tok.encode(TEXT).ids
    tokens = [0] + ids
    want, scored = 0.0, 1
    while scored < len(tokens):  # disjoint windows of 16 by hand
        end = min(scored + 16, len(tokens))
        want -= direct_loglik(model, tokens[max(0, end - 17):scored], tokens[scored:end])
        scored = end
    assert rolling_nll(short, ids, eos_id=0) == pytest.approx(want, abs=1e-3)
    assert rolling_nll(model, ids, eos_id=0) != pytest.approx(want, abs=1e-3)
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    got = run_task(EvalTaskConfig(name="t", kind="perplexity", path=str(path)), short, tok)
    assert (got["window"], got["stride"]) == (16.0, 16.0)
    assert got["bits_per_byte"] == pytest.approx(want / math.log(2) / len(TEXT.encode()), rel=1e-4)


def test_perplexity_task_figures(model, tok, tmp_path):
    path = tmp_path / "wiki.txt"
    docs = ["The cat sat on the mat.", "A bird sang in the tall green tree."]
    path.write_text("\n\n".join(docs))
    spec = EvalTaskConfig(name="wt", kind="perplexity", path=str(path), separator="\n\n")
    m = run_task(spec, model, tok)
    nll = sum(-direct_loglik(model, [0], tok.encode(d).ids) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode()) for d in docs)
    assert m["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert m["byte_perplexity"] == pytest.approx(math.exp(nll / nbytes), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-4)
    assert m["documents"] == 2


def test_cloze_accuracy_and_perplexity(model, tok, tmp_path):
    passages = ["The cat sat on the mat", "The dog ran to the park"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in passages))
    m = run_task(EvalTaskConfig(name="lambada", kind="cloze", path=str(path)), model, tok)
    lls, greedy = [], []
    for p in passages:
        ctx, target = split_last_word(p)
        c, t = tok.encode(ctx).ids, tok.encode(target).ids
        lls.append(direct_loglik(model, c, t))
        seq = torch.tensor([c + t])
        with torch.no_grad():
            logits, _ = model(seq[:, :-1])
        greedy.append(logits[0, len(c) - 1:].argmax(-1).tolist() == t)
    assert m["ppl"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-4)
    assert m["acc"] == sum(greedy) / 2


def test_multiple_choice_acc_and_acc_norm(model, tok, tmp_path):
    rows = [{"context": "The cat sat on the", "choices": [" mat", " tall green tree"], "label": 0},
            {"context": "A bird sang in the", "choices": [" park", " tree"], "label": 1},
            {"context": "The sun rose over the", "choices": [" hills", " dog", " mat"], "label": 0}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    m = run_task(EvalTaskConfig(name="mc", kind="choice", path=str(path)), model, tok)
    acc = acc_norm = 0
    for r in rows:
        ctx = tok.encode(r["context"]).ids
        ll = [direct_loglik(model, ctx, tok.encode(c).ids) for c in r["choices"]]
        acc += max(range(len(ll)), key=ll.__getitem__) == r["label"]
        acc_norm += max(range(len(ll)), key=lambda j: ll[j] / len(r["choices"][j])) == r["label"]
    assert m["acc"] == pytest.approx(acc / 3) and m["acc_norm"] == pytest.approx(acc_norm / 3)
    assert "f1" not in m  # not every example is binary


def test_glue_layouts_and_f1(model, tok, tmp_path):
    path = tmp_path / "sst2.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in
                              [("the cat sat", 1), ("the dog ran", 0), ("a bird sang", 1)]))
    spec = EvalTaskConfig(name="sst2", kind="sst2", path=str(path))
    ctx, choices, label = examples(spec)[0]
    assert ctx == "the cat sat\nQuestion: Is this sentence positive or negative?\nAnswer:"
    assert choices == [" negative", " positive"] and label == 1
    m = run_task(spec, model, tok)
    preds = []
    for c, ch, _ in examples(spec):
        ll = [direct_loglik(model, tok.encode(c).ids, tok.encode(x).ids) for x in ch]
        preds.append(int(ll[1] > ll[0]))
    labels = [1, 0, 1]
    tp = sum(p == y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    assert m["acc"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 3)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    copa = tmp_path / "copa.jsonl"
    copa.write_text(json.dumps({"premise": "The man broke his toe.", "choice1": "He dropped a hammer.",
                                "choice2": "He got a hole in his sock.", "question": "cause", "label": 0}))
    c, ch, y = examples(EvalTaskConfig(name="copa", kind="copa", path=str(copa)))[0]
    assert (c, ch, y) == ("The man broke his toe because", [" he dropped a hammer.", " he got a hole in his sock."], 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence1": "x"}))
    with pytest.raises(ValueError, match="example 1 does not fit the 'rte' layout"):
        examples(EvalTaskConfig(name="rte", kind="rte", path=str(bad)))


def test_fewshot_prefix_changes_the_prompt_deterministically(model, tok, tmp_path):
    rows = [{"context": f"The cat sat on the {w}", "choices": [" mat", " tree"], "label": i % 2}
            for i, w in enumerate(["red", "blue", "green", "old"])]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    zero = run_task(EvalTaskConfig(name="mc", kind="choice", path=str(path)), model, tok)
    two_a = run_task(EvalTaskConfig(name="mc", kind="choice", path=str(path), num_fewshot=2), model, tok)
    two_b = run_task(EvalTaskConfig(name="mc", kind="choice", path=str(path), num_fewshot=2), model, tok)
    assert two_a == two_b and zero["examples"] == two_a["examples"] == 4


def test_contamination_flags_shared_13_grams():
    train = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    index = training_index(train, 13)
    clean = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"
    dirty = "Prefix: ONE two three four five six seven eight nine ten eleven twelve thirteen!"
    assert contaminated_fraction([clean, dirty], index, 13) == 0.5
    assert contaminated_fraction([clean], index, 13) == 0.0
