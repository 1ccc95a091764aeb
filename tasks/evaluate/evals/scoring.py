"""Log-likelihood primitives shared by every evaluation task (fp32, no gradients).

- `continuation_loglik`: log p(continuation | context) summed over the continuation's tokens, and
  whether greedy decoding would have produced exactly the continuation (LAMBADA-style accuracy).
- `rolling_nll`: total NLL of a text scored in windows of at most the model's context, every token
  predicted exactly once, the first from an `<|endoftext|>` prefix, the way lm-evaluation-harness
  scores `loglikelihood_rolling`. With `stride < context`, windows overlap so each token after the
  first window sees `context - stride` tokens of history (the strided perplexity of HF's guide).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Documents of a local JSONL file; a malformed line is an error naming file and line."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if limit is not None and len(docs) >= limit:
                break
    return docs


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_loglik(model, requests: list[tuple[list[int], list[int]]],
                        batch_size: int = 8) -> list[tuple[float, bool]]:
    """[(context ids, continuation ids)] -> [(sum log-prob of continuation, is greedy)]."""
    model.eval()
    max_len = model.config.max_position_embeddings
    out: list[tuple[float, bool]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        seqs, n_cont = [], []
        for ctx, cont in chunk:
            if not cont:
                raise ValueError("empty continuation")
            seq = (ctx + cont)[-(max_len + 1):]  # keep the continuation, crop the oldest context
            seqs.append(seq)
            n_cont.append(len(cont))
        width = max(len(s) for s in seqs) - 1
        inp = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            inp[i, :len(s) - 1] = torch.tensor(s[:-1])
        logits, _ = model(inp.to(_device(model)))
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, s in enumerate(seqs):
            k = n_cont[i]
            pos = torch.arange(len(s) - 1 - k, len(s) - 1)
            target = torch.tensor(s[-k:])
            lp = logp[i, pos]  # (k, V)
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


@torch.no_grad()
def rolling_nll(model, ids: list[int], eos_id: int, stride: int | None = None) -> float:
    """Total NLL (nats) of `ids`, each token predicted once with up to a full context of history."""
    model.eval()
    max_len = model.config.max_position_embeddings
    stride = min(stride or max_len, max_len)
    tokens = [eos_id] + list(ids)
    total, scored = 0.0, 1  # tokens[0] (the prefix) is never a target
    while scored < len(tokens):
        end = min(scored + stride, len(tokens))
        begin = max(0, end - 1 - max_len)
        inp = torch.tensor([tokens[begin:end - 1]], device=_device(model))
        tgt = torch.tensor(tokens[begin + 1:end], device=_device(model))
        logits, _ = model(inp)
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        new = end - scored  # only targets not scored by an earlier window
        total -= float(logp[-new:].gather(1, tgt[-new:, None]).sum())
        scored = end
    return total
