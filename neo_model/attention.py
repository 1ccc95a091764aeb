"""Attention kernels for GPT-Neo: the local-window mask, chunked local attention and FlexAttention.

All take q, k, v as (B, T, C) with heads side by side and use unscaled scores (scale=1.0), as GPT-Neo
does. GPTNeo picks one per local layer (see GPTNeo.attn_backend); global layers use SDPA's causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


ATTN_BACKENDS = ("auto", "sdpa", "chunked", "flex")
# Which local-attention implementation "auto" uses on CPU. Measured with benchmarks/bench_model.py
# --backends (fwd+bwd, T 1024, window 256): see benchmarks/RESULTS.md.
CPU_AUTO_LOCAL_BACKEND = "chunked"


def attention_mask(q_start: int, q_len: int, k_len: int, window: int | None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True = may attend, for queries at positions q_start.. and keys 0..

    Causal (key j <= query i); with `window`, additionally i - j < window (the local band).
    """
    i = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)  # (Tq, 1)
    j = torch.arange(k_len, device=device).unsqueeze(0)  # (1, Tk)
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs) as a view."""
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, nh * hs)."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


class _PairBlocks(torch.autograd.Function):
    """(B, nb, W, C) key blocks -> (B, nb - 1, 2W, C): block b-1 followed by block b, for b = 1..nb-1.

    A custom backward writes each input block's gradient once (copy + add) instead of the zero-filled
    full-size buffers that two slices plus torch.cat would allocate in autograd.
    """

    @staticmethod
    def forward(ctx, blocks: torch.Tensor) -> torch.Tensor:
        return torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        B, n, W2, C = grad.shape
        W = W2 // 2
        g = grad.new_empty(B, n + 1, W, C)
        g[:, :-1] = grad[:, :, :W]
        g[:, -1] = 0
        g[:, 1:] += grad[:, :, W:]
        return g


_band_masks: dict = {}


def _additive_band(W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(W, 2W) additive mask (0 or -inf): query a of a block (position bW+a) sees key c of the previous
    and own block (position (b-1)W+c) iff a < c <= a + W. Float, so SDPA does not convert it per call."""
    key = (W, dtype, device)
    mask = None if torch.compiler.is_compiling() else _band_masks.get(key)
    if mask is None:
        a = torch.arange(W, device=device).unsqueeze(1)
        c = torch.arange(2 * W, device=device).unsqueeze(0)
        allowed = (c > a) & (c <= a + W)
        mask = torch.zeros(W, 2 * W, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
        if not torch.compiler.is_compiling():
            _band_masks[key] = mask
    return mask


def chunked_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int,
                            window: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Sliding-window causal attention (key j visible to query i iff j <= i and i - j < window).

    q, k, v: (B, T, C) with heads side by side; returns (B, T, C). Queries go in blocks of `window`;
    block b >= 1 (positions bW .. bW+W-1) only needs keys (b-1)W+1 .. bW+W-1, so it attends to the
    previous and its own key block (2W keys) under one fixed (W, 2W) band mask; block 0 is plain causal.
    Work and memory are O(T * W) instead of SDPA-with-mask's dense O(T^2).
    """
    B, T, C = q.shape
    W = window
    first = min(T, W)
    y0 = _merge_heads(F.scaled_dot_product_attention(
        _heads(q[:, :first], n_head), _heads(k[:, :first], n_head), _heads(v[:, :first], n_head),
        is_causal=True, dropout_p=dropout_p, scale=1.0))
    if T <= W:
        return y0
    nb = -(-T // W)  # blocks, the last one padded
    pad = nb * W - T
    if pad:  # padded keys sit after every real query, so the causal band never shows them to one
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    D = C // n_head
    n = B * (nb - 1)
    # (B*(nb-1), nh, W, hs) query views: batch and block strides merge.
    qb = q[:, W:].reshape(n, W, n_head, D).transpose(1, 2)
    kk = _PairBlocks.apply(k.reshape(B, nb, W, C)).view(n, 2 * W, n_head, D).transpose(1, 2)
    vv = _PairBlocks.apply(v.reshape(B, nb, W, C)).view(n, 2 * W, n_head, D).transpose(1, 2)
    yb = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=_additive_band(W, q.dtype, q.device),
                                        dropout_p=dropout_p, scale=1.0)
    y = torch.cat([y0, yb.transpose(1, 2).reshape(B, (nb - 1) * W, C)], dim=1)
    return y[:, :T] if pad else y


_flex = None  # (flex_attention, create_block_mask) once imported; False when unavailable


def _flex_api():
    global _flex
    if _flex is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            _flex = (flex_attention, create_block_mask)
        except ImportError:  # older torch: callers fall back to SDPA / chunked
            _flex = False
    return _flex


_compiled_flex: dict = {}


def flex_usable(device: torch.device, needs_grad: bool) -> bool:
    """FlexAttention runs compiled on CUDA; on CPU only eagerly and without backward (torch 2.13)."""
    if not _flex_api():
        return False
    return device.type == "cuda" or not needs_grad


def flex_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, window: int,
                         block_mask_cache: dict) -> torch.Tensor:
    """Sliding-window attention with FlexAttention: q, k, v (B, T, C) -> (B, T, C).

    The block mask comes from mask_mod (kv <= q) & (q - kv < window), so fully masked blocks are skipped;
    on CUDA the kernel is compiled (the unfused eager version materialises the scores).
    """
    flex_attention, create_block_mask = _flex_api()
    T = q.size(1)
    key = (T, window, q.device)
    block_mask = block_mask_cache.get(key)  # under torch.compile a mask made beforehand is reused too
    if block_mask is None:
        def sliding_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
        block_mask = create_block_mask(sliding_window, None, None, T, T, device=q.device)
        if not torch.compiler.is_compiling():
            block_mask_cache[key] = block_mask
    fn = flex_attention
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        fn = _compiled_flex.get("fn")
        if fn is None:
            fn = _compiled_flex["fn"] = torch.compile(flex_attention, dynamic=False)
    y = fn(_heads(q, n_head), _heads(k, n_head), _heads(v, n_head), block_mask=block_mask, scale=1.0)
    return _merge_heads(y)
