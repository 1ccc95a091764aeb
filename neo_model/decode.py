"""One compiled decode step of greedy/sampled generation against the preallocated KV caches.

At batch 4 on a CPU a decode step is ~30 weight matmuls of a few microseconds to a millisecond each,
and the eager path spends as long again in the ~100 small ops around them (layer norms, GELU, residual
adds, cache writes, attention on the cache) and in Python between them. `decode_step` is the whole step
(embedding to last-position logits) written with fixed shapes only: every layer's cache is attended in
full under its `valid` mask (unwritten and left-padded slots are False), and the write position comes
in as a tensor, so one `torch.compile` graph (inductor: the matmuls stay MKL calls, everything between
them becomes a few fused C++ loops) serves every step of a generate call, and every later call with
the same batch size and cache capacity.

Compiling takes tens of seconds on a small CPU, so it is opt-in: `GPTNeo.generate(..., compile=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import _heads, _merge_heads

_compiled = None


def decode_step(model, caches: list, qkv: list[torch.Tensor], ids: torch.Tensor, pos: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) in fp32 of the token after `ids` (B, 1) at positions `pos` (B, 1).

    caches: the model's KVCache objects (their k, v, valid tensors are written in place at the slot for
    this token: slots[0] for global layers, slots[1] for local ones, both 1-element int64 tensors).
    qkv: each layer's fused q/k/v weight (3C, C).
    """
    t = model.transformer
    x = t.wte(ids) + t.wpe(pos)  # (B, 1, C)
    C = x.size(-1)
    for block, cache, w in zip(t.h, caches, qkv):
        attn = block.attn.attention
        H = attn.n_head
        q, k, v = F.linear(block.ln_1(x), w).split(C, dim=2)
        slot = slots[1] if cache.window is not None else slots[0]
        cache.k.index_copy_(2, slot, _heads(k, H))
        cache.v.index_copy_(2, slot, _heads(v, H))
        cache.valid.index_fill_(1, slot, True)
        # one query against the whole cache: plain matmul/softmax (SDPA's CPU flash kernel costs ~0.3 ms
        # a call at this size); unwritten and padded slots get -inf, i.e. weight 0
        # (as broadcast products and sums, which inductor turns into vectorised loops over head_dim)
        scores = (_heads(q, H) * cache.k).sum(-1)  # (B, H, slots), unscaled
        scores = scores.masked_fill(~cache.valid[:, None, :], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        y = (p.unsqueeze(-1) * cache.v).sum(-2, keepdim=True)  # (B, H, 1, hs)
        x = x + attn.out_proj(_merge_heads(y))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(t.ln_f(x)[:, -1]).float()


def compiled_decode_step():
    """`decode_step` under torch.compile (built once per process; graphs are cached per model and shape)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(decode_step, dynamic=False)
    return _compiled
