"""Train/test overlap: the share of an eval task's examples that share a word n-gram with training data.

GPT-3 (Brown et al. 2020, appendix C) flagged an example as potentially contaminated when any of its
13-grams also occurred in the training set; we report the same fraction per task, so a score on a
contaminated task can be discounted. n-grams are lowercase word sequences, stored as 64-bit hashes.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable

_WORD = re.compile(r"\w+")


def ngram_hashes(text: str, n: int) -> set[int]:
    words = _WORD.findall(text.lower())
    return {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest(), "little")
            for i in range(len(words) - n + 1)}


def training_index(texts: Iterable[str], n: int) -> set[int]:
    index: set[int] = set()
    for t in texts:
        index |= ngram_hashes(t, n)
    return index


def contaminated_fraction(examples: list[str], index: set[int], n: int) -> float:
    if not examples:
        return 0.0
    return sum(1 for e in examples if ngram_hashes(e, n) & index) / len(examples)


def example_texts(spec) -> list[str]:
    """The full text of each example of a configured task, as it would meet the model."""
    from tasks.evaluate.evals.choice import examples
    from tasks.evaluate.evals.perplexity import documents
    from tasks.evaluate.evals.scoring import read_jsonl

    if spec.kind == "perplexity":
        return documents(spec)
    if spec.kind == "cloze":
        return [d[spec.text_field] for d in read_jsonl(spec.path, spec.limit)]
    return [ctx + " " + " ".join(choices) for ctx, choices, _ in examples(spec)]
