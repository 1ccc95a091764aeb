"""Evaluation tasks: each module scores a model on local data behind one small interface.

`run_task(spec, model, tokenizer) -> dict[str, float]` dispatches on `spec.kind`. Scoring primitives
(log-likelihood of a continuation, rolling log-likelihood of a whole text) live in `scoring`.
"""
from __future__ import annotations

from tasks.evaluate.evals.choice import GLUE_KINDS, run_choice
from tasks.evaluate.evals.cloze import run_cloze
from tasks.evaluate.evals.perplexity import run_perplexity

KINDS = ("perplexity", "cloze", "choice", *GLUE_KINDS)


def run_task(spec, model, tokenizer) -> dict[str, float]:
    """Score one configured task; metric names are prefixed by nothing (the caller adds the task name)."""
    if spec.kind == "perplexity":
        return run_perplexity(spec, model, tokenizer)
    if spec.kind == "cloze":
        return run_cloze(spec, model, tokenizer)
    return run_choice(spec, model, tokenizer)
