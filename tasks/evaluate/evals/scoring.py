"""Log-likelihood primitives shared by every evaluation task (fp32, no gradients).

- `continuation_loglik`: log p(continuation | context) summed over the continuation's tokens, and
  whether greedy decoding would have produced exactly the continuation (LAMBADA-style accuracy).
- `rolling_nll`: total NLL of a text scored in windows of at most the model's context (the context it
  was trained at, `config.context`; a model trained on short rows scores badly at unseen positions), every token
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
    max_len = model.config.context
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


def rolling_windows(n_tokens: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, new) windows over `n_tokens` tokens (the first being the `<|endoftext|>` prefix):
    inputs tokens[begin:end-1], targets tokens[begin+1:end], of which the last `new` are scored."""
    stride = min(stride or context, context)
    windows, scored = [], 1  # tokens[0] (the prefix) is never a target
    while scored < n_tokens:
        end = min(scored + stride, n_tokens)
        windows.append((max(0, end - 1 - context), end, end - scored))
        scored = end
    return windows


@torch.no_grad()
def rolling_nll(model, ids: list[int], eos_id: int, stride: int | None = None, batch_size: int = 8) -> float:
    """Total NLL (nats) of `ids`, each token predicted once with up to a full context of history;
    windows of equal width run `batch_size` at a time."""
    model.eval()
    tokens = torch.tensor([eos_id] + list(ids), dtype=torch.long)
    by_width: dict[int, list[tuple[int, int, int]]] = {}
    for w in rolling_windows(len(tokens), model.config.context, stride):
        by_width.setdefault(w[1] - 1 - w[0], []).append(w)
    total = 0.0
    for group in by_width.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            inp = torch.stack([tokens[b:e - 1] for b, e, _ in chunk]).to(_device(model))
            tgt = torch.stack([tokens[b + 1:e] for b, e, _ in chunk]).to(_device(model))
            nll = model.token_nll(inp, tgt).double()  # (B, width)
            total += sum(float(nll[j, -new:].sum()) for j, (_, _, new) in enumerate(chunk))
    return total
