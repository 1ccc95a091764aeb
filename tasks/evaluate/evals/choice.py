"""Multiple choice by log-likelihood ranking (HellaSwag/PIQA style) and GLUE-style classification.

Generic JSONL (`kind: choice`): `{"context": str, "choices": [str, ...], "label": int}`; each choice is
scored as the continuation of the context exactly as written (include its leading space).
acc = argmax log-likelihood; acc_norm = argmax log-likelihood per character of the choice, as
lm-evaluation-harness normalizes. GLUE/SuperGLUE kinds read the datasets' published field layouts and
turn them into prompted choices; binary tasks also report F1 of the positive class (label 1).
Few-shot: `num_fewshot` solved examples (context + correct choice) drawn with a seed from
`fewshot_path`, or from the other examples of the same file, are prepended.
"""
from __future__ import annotations

import random

from tasks.evaluate.evals.scoring import continuation_loglik, read_jsonl


def _sst2(d):  # {"sentence", "label": 0 negative / 1 positive}
    return (f"{d['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:",
            [" negative", " positive"], int(d["label"]))


def _rte(d):  # {"sentence1", "sentence2", "label": 0 entailment / 1 not_entailment}
    return (f"{d['sentence1'].strip()}\nQuestion: {d['sentence2'].strip()} True or False?\nAnswer:",
            [" True", " False"], int(d["label"]))


def _boolq(d):  # {"passage", "question", "label": 0 false / 1 true}
    return (f"{d['passage'].strip()}\nQuestion: {d['question'].strip()}?\nAnswer:",
            [" no", " yes"], int(d["label"]))


def _copa(d):  # {"premise", "choice1", "choice2", "question": cause|effect, "label": 0|1}
    connector = {"cause": "because", "effect": "therefore"}[d["question"]]
    premise = d["premise"].strip().rstrip(".")

    def lower_first(s: str) -> str:
        return s[:1].lower() + s[1:]

    return (f"{premise} {connector}", [" " + lower_first(d["choice1"]), " " + lower_first(d["choice2"])],
            int(d["label"]))


def _generic(d):
    return d["context"], list(d["choices"]), int(d["label"])


GLUE_KINDS = ("sst2", "rte", "boolq", "copa")
_FORMATS = {"choice": _generic, "sst2": _sst2, "rte": _rte, "boolq": _boolq, "copa": _copa}


def examples(spec) -> list[tuple[str, list[str], int]]:
    fmt = _FORMATS[spec.kind]
    out = []
    for n, d in enumerate(read_jsonl(spec.path, spec.limit), 1):
        try:
            ctx, choices, label = fmt(d)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{spec.path}: example {n} does not fit the {spec.kind!r} layout ({exc!r})") from None
        if not 0 <= label < len(choices):
            raise ValueError(f"{spec.path}: example {n} has label {label} for {len(choices)} choices")
        out.append((ctx, choices, label))
    return out


def _fewshot_prefix(spec, pool: list, exclude: int | None, rng: random.Random) -> str:
    if not spec.num_fewshot:
        return ""
    candidates = [ex for i, ex in enumerate(pool) if i != exclude]
    shots = rng.sample(candidates, min(spec.num_fewshot, len(candidates)))
    return "".join(f"{ctx}{choices[label]}\n\n" for ctx, choices, label in shots)


def run_choice(spec, model, tokenizer) -> dict[str, float]:
    data = examples(spec)
    if not data:
        raise ValueError(f"eval task {spec.name!r}: no examples in {spec.path}")
    pool = data
    same_file = True
    if spec.fewshot_path:
        pool = examples(spec.model_copy(update={"path": spec.fewshot_path, "limit": None}))
        same_file = False
    rng = random.Random(spec.fewshot_seed)
    requests, spans = [], []
    for i, (ctx, choices, _) in enumerate(data):
        prefix = _fewshot_prefix(spec, pool, i if same_file else None, rng)
        ctx_ids = tokenizer.encode(prefix + ctx).ids
        spans.append((len(requests), len(choices)))
        requests += [(ctx_ids, tokenizer.encode(c).ids) for c in choices]
    scores = [ll for ll, _ in continuation_loglik(model, requests)]
    correct = correct_norm = tp = fp = fn = 0
    for (ctx, choices, label), (start, k) in zip(data, spans):
        ll = scores[start:start + k]
        pred = max(range(k), key=lambda j: ll[j])
        pred_norm = max(range(k), key=lambda j: ll[j] / max(1, len(choices[j])))
        correct += pred == label
        correct_norm += pred_norm == label
        tp += pred == 1 and label == 1
        fp += pred == 1 and label != 1
        fn += pred != 1 and label == 1
    n = len(data)
    metrics = {"acc": correct / n, "acc_norm": correct_norm / n, "examples": float(n)}
    if all(len(c) == 2 for _, c, _ in data):
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return metrics
