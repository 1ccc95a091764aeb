"""Perplexity of held-out text files, reported the way lm-evaluation-harness reports WikiText.

word_perplexity = exp(NLL / words), byte_perplexity = exp(NLL / UTF-8 bytes),
bits_per_byte = NLL / bytes / ln 2, token_perplexity = exp(NLL / tokens). A file is one document,
or several split by `spec.separator`; each document is scored with `rolling_nll` in windows of the
context the model was trained at (`window`, reported with the `stride`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from tasks.evaluate.evals.scoring import read_jsonl, rolling_nll


def documents(spec) -> list[str]:
    path = Path(spec.path)
    if path.suffix == ".jsonl":
        docs = [d[spec.text_field] for d in read_jsonl(path)]
    else:
        text = path.read_text(encoding="utf-8")
        docs = text.split(spec.separator) if spec.separator else [text]
    docs = [d for d in docs if d.strip()]
    return docs[:spec.limit] if spec.limit else docs


def run_perplexity(spec, model, tokenizer) -> dict[str, float]:
    eos = model.config.eos_token_id
    nll = words = nbytes = ntokens = 0
    for doc in documents(spec):
        ids = tokenizer.encode(doc).ids
        nll += rolling_nll(model, ids, eos, spec.stride)
        words += len(re.split(r"\s+", doc))  # lm-evaluation-harness counts words exactly this way
        nbytes += len(doc.encode("utf-8"))
        ntokens += len(ids)
    if not nbytes:
        raise ValueError(f"eval task {spec.name!r}: no text in {spec.path}")
    return {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / nbytes),
            "bits_per_byte": nll / nbytes / math.log(2), "token_perplexity": math.exp(nll / ntokens),
            "documents": float(len(documents(spec))), "window": float(model.config.context),
            "stride": float(min(spec.stride or model.config.context, model.config.context))}
