"""LAMBADA-style cloze: predict a passage's last word from everything before it.

Input JSONL: one `{"text": "..."}` per passage. The context is the text before the last space and the
target is the last word with its leading space. acc = fraction where greedy decoding reproduces the
whole target; ppl = exp(-mean log-likelihood of the target).
"""
from __future__ import annotations

import math

from tasks.evaluate.evals.scoring import continuation_loglik, read_jsonl


def split_last_word(text: str) -> tuple[str, str]:
    text = text.rstrip()
    ctx, _, last = text.rpartition(" ")
    if not ctx:
        raise ValueError(f"cloze passage has a single word: {text[:60]!r}")
    return ctx, " " + last


def run_cloze(spec, model, tokenizer) -> dict[str, float]:
    docs = read_jsonl(spec.path, spec.limit)
    requests = []
    for d in docs:
        ctx, target = split_last_word(d[spec.text_field])
        requests.append((tokenizer.encode(ctx).ids, tokenizer.encode(target).ids))
    scores = continuation_loglik(model, requests)
    n = len(scores)
    if not n:
        raise ValueError(f"eval task {spec.name!r}: no passages in {spec.path}")
    return {"acc": sum(g for _, g in scores) / n, "ppl": math.exp(-sum(ll for ll, _ in scores) / n),
            "examples": float(n)}
