"""GPT-Neo in plain PyTorch, numerically equivalent to `transformers.GPTNeoForCausalLM` (eager, fp32).

GPT-Neo is GPT-2 with three differences that matter for compatibility:
1. every other layer uses *local* attention: query i sees keys j with j <= i and i - j < window_size;
2. attention scores are NOT scaled by 1/sqrt(head_dim) (Mesh-TF folded the scale into the q init);
3. q/k/v projections have no bias.
Submodule names reproduce HF's state-dict keys exactly (transformer.h.{i}.attn.attention.q_proj, ...), so
checkpoints move between the two implementations without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (ATTN_BACKENDS, CPU_AUTO_LOCAL_BACKEND, _flex_api, _heads, _merge_heads,
                        attention_mask, chunked_local_attention, flex_local_attention, flex_usable)
from .config import GPTNeoConfig
from .decode import compiled_decode_step
from .fused import linear_cross_entropy

__all__ = ["GPTNeo", "KVCache", "attention_mask", "chunked_local_attention"]

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_new" = GPT-2's tanh approximation
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class KVCache:
    """Preallocated keys/values of one layer for incremental decoding, each (B, nh, slots, hs).

    A global layer keeps every position (slots = longest sequence). A local layer keeps only the last
    `window` keys in a ring (slot = index % window): older keys are outside every later query's window.
    Keys carry their position (it is added to the layer input), so the order of slots does not matter
    to attention. `valid` marks slots holding real tokens, False for left padding.
    """

    def __init__(self, batch: int, n_head: int, head_dim: int, capacity: int, window: int | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.window = window
        self.slots = min(capacity, window) if window is not None else capacity
        # zeros, not empty: the compiled decode step reads every slot, and 0-weight x garbage (NaN) is NaN
        self.k = torch.zeros(batch, n_head, self.slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, self.slots, dtype=torch.bool, device=device)  # True once written
        self.padded = False  # any invalid slot ever written: decode steps then need a key mask
        self.length = 0  # tokens written so far = index of the next token

    def prefill(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        """Store the prompt's keys/values (B, nh, T, hs); key_valid (B, T) or None (all real)."""
        T = k.size(2)
        if T > self.slots and self.window is None:
            raise ValueError(f"prompt of {T} tokens exceeds the cache capacity {self.slots}")
        m = min(T, self.slots)
        slots = torch.arange(T - m, T, device=k.device) % self.slots
        self.k.index_copy_(2, slots, k[:, :, T - m:])
        self.v.index_copy_(2, slots, v[:, :, T - m:])
        if key_valid is not None:
            self.valid[:, slots] = key_valid[:, T - m:]
            self.padded = True
        else:
            self.valid[:, slots] = True
        self.length = T

    def append(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add one token (B, nh, 1, hs); return the keys, values and key mask its query attends to."""
        slot = self.length % self.slots if self.window is not None else self.length
        if slot >= self.slots:
            raise ValueError(f"cache full ({self.slots} positions)")
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        self.valid[:, slot] = True
        self.length += 1
        n = min(self.length, self.slots)  # ring slots fill in order 0, 1, ... before wrapping
        mask = self.valid[:, None, None, :n] if self.padded else None  # (B, 1, 1, n)
        return self.k[:, :, :n], self.v[:, :, :n], mask


@dataclass
class _Plan:
    """How one forward pass attends: built by GPTNeo._hidden, read by every SelfAttention."""

    local_impl: str  # "sdpa" | "chunked" | "flex" for local layers of a full causal pass
    window: int
    masks: dict  # attention kind -> explicit bool mask for SDPA, or None (causal / implementation's own)
    key_valid: torch.Tensor | None = None  # (B, T) False at left padding, for the cache
    decode: bool = False  # one new token per row against the KV cache
    block_masks: dict | None = None  # FlexAttention block masks by (T, window, device)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention, global or local (sliding window), without score scaling."""

    def __init__(self, config: GPTNeoConfig, attention_type: str):
        super().__init__()
        self.attention_type = attention_type
        self.n_head = config.num_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        # No bias on q/k/v, bias on the output projection: the layout of the released checkpoints.
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=True)
        self.attn_dropout = config.attention_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout)
        # Fused (3d, d) projection weight held during generation; None means concatenate per call.
        self._qkv_weight: torch.Tensor | None = None

    def qkv_weight(self) -> torch.Tensor:
        """q, k and v weights stacked, so one matmul projects all three (keys stay HF's separate names)."""
        if self._qkv_weight is not None:
            return self._qkv_weight
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def forward(self, x: torch.Tensor, plan: _Plan, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.size()
        q, k, v = F.linear(x, self.qkv_weight()).split(C, dim=2)  # each (B, T, C), heads side by side
        H = self.n_head
        dropout_p = self.attn_dropout if self.training else 0.0
        # scale=1.0 everywhere: GPT-Neo uses raw q.k scores; the 1/sqrt(hs) lives in the q init instead.
        if plan.decode:
            kc, vc, mask = cache.append(_heads(k, H), _heads(v, H))
            y = _merge_heads(F.scaled_dot_product_attention(_heads(q, H), kc, vc, attn_mask=mask, scale=1.0))
            return self.resid_dropout(self.out_proj(y))
        if cache is not None:
            cache.prefill(_heads(k, H), _heads(v, H), plan.key_valid)
        local = self.attention_type == "local"
        mask = plan.masks[self.attention_type]
        if mask is None and local and T > plan.window and plan.local_impl == "chunked":
            y = chunked_local_attention(q, k, v, H, plan.window, dropout_p)
        elif mask is None and local and T > plan.window and plan.local_impl == "flex":
            y = flex_local_attention(q, k, v, H, plan.window, plan.block_masks)
        else:
            qh, kh, vh = _heads(q, H), _heads(k, H), _heads(v, H)
            if mask is None:  # global, or local with the whole sequence inside the window
                y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, dropout_p=dropout_p, scale=1.0)
            else:
                y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
            y = _merge_heads(y)
        return self.resid_dropout(self.out_proj(y))


class Attention(nn.Module):
    """Holder whose only job is the `attn.attention.*` key level of HF checkpoints."""

    def __init__(self, config: GPTNeoConfig, attention_type: str):
        super().__init__()
        self.attention = SelfAttention(config, attention_type)

    def forward(self, x: torch.Tensor, plan: _Plan, cache: KVCache | None = None) -> torch.Tensor:
        return self.attention(x, plan, cache)


class MLP(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTNeoConfig, attention_type: str):
        super().__init__()
        self.attention_type = attention_type
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, attention_type)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, plan: _Plan, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), plan, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (B, V); HF's order (k, then p)."""
    if top_k:  # None or 0 disables the filter, as in HF
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass strictly above it is below top_p: the smallest set reaching top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class GPTNeo(nn.Module):
    """GPT-Neo causal language model; `forward(ids, targets)` returns (logits, loss).

    `attn_backend` picks the local-attention implementation of full passes: "auto" (CUDA: FlexAttention,
    CPU: CPU_AUTO_LOCAL_BACKEND), "sdpa" (dense band mask), "chunked" (blocks of `window` queries) or "flex".
    Where FlexAttention cannot run (not importable, or training on CPU) "flex" falls back to SDPA on CUDA
    and to chunked on CPU. Global layers always use SDPA's causal kernel. It is a plain attribute, so it
    can be changed on a built model.
    """

    def __init__(self, config: GPTNeoConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),
            wpe=nn.Embedding(config.max_position_embeddings, config.hidden_size),
            drop=nn.Dropout(config.embed_dropout),
            h=nn.ModuleList([Block(config, kind) for kind in config.attention_layers]),
            ln_f=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in every released GPT-Neo
        # Local band masks by (T, window, device) and FlexAttention block masks; plain dicts, so they are
        # neither parameters nor in state_dict.
        self._mask_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._block_masks: dict = {}
        self._init_weights()

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        if value not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {value!r}")
        self._attn_backend = value

    # ---- initialisation -----------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mesh-TF (EleutherAI/gpt-neo models/layers.py) init, for training from scratch.

        Because scores are not scaled at run time, q is initialised with std d^-1/2 * hs^-1/2 and k with
        d^-1/2, so q.k has variance ~1 at init (N(0, 0.02) for q would make logits ~sqrt(hs) too large).
        """
        c = self.config
        std = c.initializer_range  # 0.02
        d, L = c.hidden_size, c.num_layers
        nn.init.normal_(self.transformer.wte.weight, std=std)
        nn.init.normal_(self.transformer.wpe.weight, std=std / 2)  # 0.01 at the default, as in Mesh-TF
        for block in self.transformer.h:
            attn = block.attn.attention
            nn.init.normal_(attn.q_proj.weight, std=d ** -0.5 * c.head_dim ** -0.5)
            nn.init.normal_(attn.k_proj.weight, std=d ** -0.5)
            nn.init.normal_(attn.v_proj.weight, std=d ** -0.5)
            nn.init.normal_(attn.out_proj.weight, std=d ** -0.5)  # input width is nh * hs = d
            nn.init.zeros_(attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            # scale_by_depth: the projection writing into the residual stream shrinks with depth.
            nn.init.normal_(block.mlp.c_proj.weight, std=std / math.sqrt(L))
            nn.init.zeros_(block.mlp.c_proj.bias)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- forward ------------------------------------------------------------------------------------

    def local_impl(self, device: torch.device) -> str:
        """The local-attention implementation a full pass on `device` uses now (after fallbacks)."""
        backend = self.attn_backend
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else CPU_AUTO_LOCAL_BACKEND
        if backend == "flex":
            needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            if not flex_usable(device, needs_grad):
                backend = "sdpa" if device.type == "cuda" else "chunked"
        return backend

    def prepare_flex(self, seq_len: int, device: torch.device | str) -> None:
        """Build the FlexAttention block mask for seq_len now (call before torch.compile on CUDA, so the
        compiled graph reuses it instead of rebuilding it every step)."""
        if _flex_api():
            _, create_block_mask = _flex_api()
            W = self.config.window_size

            def sliding_window(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < W)
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:  # key it as tensors report their device
                device = torch.device("cuda", torch.cuda.current_device())
            self._block_masks[(seq_len, W, device)] = create_block_mask(sliding_window, None, None, seq_len,
                                                                        seq_len, device=device)

    def _band_mask(self, T: int, device: torch.device) -> torch.Tensor:
        """(T, T) local band mask, cached per (T, window, device) outside torch.compile."""
        if torch.compiler.is_compiling():
            return attention_mask(0, T, T, self.config.window_size, device)
        key = (T, self.config.window_size, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = attention_mask(0, T, T, self.config.window_size, device)
        return self._mask_cache[key]

    def _plan(self, T: int, device: torch.device, key_valid: torch.Tensor | None, decode: bool) -> _Plan:
        W = self.config.window_size
        impl = self.local_impl(device)
        if decode:
            return _Plan(impl, W, {"global": None, "local": None}, decode=True)
        if key_valid is not None:
            # Left padding: hide padded keys. A padded query keeps itself so no row is fully masked
            # (its output is never used by a real token).
            eye = torch.eye(T, dtype=torch.bool, device=device)
            keys = key_valid[:, None, None, :] | eye  # (B, 1, T, T)
            masks = {"global": attention_mask(0, T, T, None, device) & keys,
                     "local": attention_mask(0, T, T, W, device) & keys}
            return _Plan(impl, W, masks, key_valid=key_valid)
        local = self._band_mask(T, device) if impl == "sdpa" and T > W else None
        return _Plan(impl, W, {"global": None, "local": local}, block_masks=self._block_masks)

    def _hidden(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                key_valid: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C).

        Without caches: a full causal pass. With caches that are still empty: a prefill that also stores
        keys/values; with filled caches: one new token per row (T == 1). key_valid (B, T) marks real
        tokens (False = left padding); position_ids (B, T) default to the token indices.
        """
        B, T = input_ids.size()
        device = input_ids.device
        decode = caches is not None and caches[0].length > 0
        start = caches[0].length if decode else 0
        if position_ids is None:
            if start + T > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {start + T} exceeds max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            pos = torch.arange(start, start + T, device=device)  # (T,)
        else:
            pos = position_ids
        if decode and T != 1:
            raise ValueError("decoding against a KV cache takes one token per row")
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))  # (B, T, C)
        plan = self._plan(T, device, key_valid, decode)
        for i, block in enumerate(self.transformer.h):
            x = block(x, plan, caches[i] if caches is not None else None)
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_logits: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids, targets: (B, T) int64. Returns logits (B, T, V) and the loss (None without targets).

        The loss is cross-entropy with ignore_index=-100: a scalar for reduction "mean"/"sum", per-token
        NLL (B, T) for "none" (0 at ignored positions). return_logits=False (with targets and a scalar
        reduction) returns (None, loss) from the fused head + loss (neo_model.fused), which never holds
        the (B, T, V) logits: the training step's path.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        h = self._hidden(input_ids)
        if targets is not None and not return_logits and reduction != "none":
            C = h.size(-1)
            return None, linear_cross_entropy(h.reshape(-1, C), self.lm_head.weight, targets.reshape(-1),
                                              reduction)
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits, None
        # fp32 log-softmax: under bf16 autocast the vocabulary-wide reduction loses precision otherwise.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction=reduction)
        if reduction == "none":
            loss = loss.view(targets.shape)
        return logits, loss

    def token_nll(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood in nats, (B, T); 0 where targets == -100."""
        return self(input_ids, targets, reduction="none")[1]

    # ---- accounting ---------------------------------------------------------------------------------

    def num_parameters(self, exclude_positions: bool = False) -> int:
        """Parameter count with the tied wte/lm_head counted once; optionally without wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_positions:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12 * sum over layers of H * Q * T_eff (REFERENCE section 4).

        T_eff is the context for global layers and min(window, context) for local layers, since a local
        query only scores that many keys.
        """
        c = self.config
        T = seq_len if seq_len is not None else c.max_position_embeddings
        n = self.num_parameters(exclude_positions=True)
        attn = sum(c.num_heads * c.head_dim * (min(c.window_size, T) if kind == "local" else T)
                   for kind in c.attention_layers)
        return 6 * n + 12 * attn

    # ---- sampling -----------------------------------------------------------------------------------

    def new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        """Empty per-layer KV caches for `capacity` positions (local layers hold only `window`)."""
        p = self.transformer.wte.weight
        c = self.config
        return [KVCache(batch, c.num_heads, c.head_dim, capacity,
                        c.window_size if kind == "local" else None, p.dtype, p.device)
                for kind in c.attention_layers]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, use_cache: bool = True, top_p: float | None = None,
                 attention_mask: torch.Tensor | None = None, compile: bool = False) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to input_ids (B, T); returns (B, T + n).

        temperature 0 means greedy; top_k None or 0 and top_p None or 1 disable those filters (applied
        in HF's order: temperature, top-k, top-p). With eos_token_id, a finished row is padded with eos
        and generation stops early once every row has finished. attention_mask (B, T), 1 = token and
        0 = left padding, lets rows of different lengths share a batch: padded rows get positions
        counted from their first real token and never attend to padding, so each row continues exactly
        as it would alone. Without padding the context is cropped to max_position_embeddings; a KV
        cache is used while the whole sequence still fits (positions shift once cropping starts).
        compile=True runs each cached decode step as one torch.compile graph (neo_model.decode): the
        same tokens with less per-op overhead (on CPU the weight matmuls then dominate; figures in
        benchmarks/RESULTS.md), but the first call for a batch size and cache capacity compiles for
        tens of seconds on a CPU, so it pays off only for long or repeated generation.
        """
        was_training = self.training
        self.eval()
        max_pos = self.config.max_position_embeddings
        idx = input_ids
        B, T0 = idx.shape
        key_valid = position_ids = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_valid = attention_mask.bool()
            if bool((key_valid[:, 1:].int() < key_valid[:, :-1].int()).any()):
                raise ValueError("attention_mask must be left padding: zeros only before the tokens")
            position_ids = (key_valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
            if T0 + max_new_tokens > max_pos:
                raise ValueError(f"padded generation needs prompt + max_new_tokens <= {max_pos}")
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        caches: list[KVCache] | None = None
        blocks = [block.attn.attention for block in self.transformer.h]
        for attn in blocks:  # one fused q/k/v weight per layer for the whole call
            attn._qkv_weight = attn.qkv_weight()
        qkv = [attn._qkv_weight for attn in blocks]
        step = compiled_decode_step() if compile else None
        warm = False
        try:
            for _ in range(max_new_tokens):
                if key_valid is not None or (use_cache and idx.size(1) <= max_pos):
                    if not use_cache:  # padded rows without a cache: recompute everything, masked
                        valid = torch.cat([key_valid, torch.ones(B, idx.size(1) - T0, dtype=torch.bool,
                                                                  device=idx.device)], dim=1)
                        pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
                        h = self._hidden(idx, None, valid, pos)
                    elif caches is None:  # prefill with the whole prompt
                        caches = self.new_caches(B, min(T0 + max_new_tokens, max_pos if key_valid is None
                                                        else T0 + max_new_tokens))
                        h = self._hidden(idx, caches, key_valid, position_ids)
                    elif compile:  # the newest token through the compiled step (fixed shapes)
                        n = caches[0].length
                        pos = (torch.full((B, 1), n, device=idx.device) if position_ids is None
                               else position_ids[:, -1:] + (idx.size(1) - T0))
                        W = self.config.window_size
                        slots = torch.tensor([[n], [n % W]], device=idx.device)
                        # After the first step of the call has checked the graph's guards, the same
                        # shapes, dtypes and weights follow: skip re-checking them every token.
                        with torch.compiler.set_stance(skip_guard_eval_unsafe=warm):
                            logits = step(self, caches, qkv, idx[:, -1:].contiguous(), pos, slots)
                        warm = True
                        for cache in caches:
                            cache.length += 1
                        h = None
                    else:  # only the newest token; earlier keys/values come from the cache
                        pos = None if position_ids is None else position_ids[:, -1:] + (idx.size(1) - T0)
                        h = self._hidden(idx[:, -1:], caches, None, pos)
                else:
                    caches = None
                    h = self._hidden(idx[:, -max_pos:])
                if h is not None:
                    logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = _filter_logits(logits / temperature, top_k, top_p)
                    probs = F.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                if eos_token_id is not None:
                    next_id = next_id.masked_fill(finished.unsqueeze(1), eos_token_id)
                    finished |= next_id.squeeze(1) == eos_token_id
                idx = torch.cat([idx, next_id], dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
        finally:
            for attn in blocks:
                attn._qkv_weight = None
            self.train(was_training)
        return idx

    # ---- checkpoints (HF layout; implemented in hf_io) ----------------------------------------------

    def save_pretrained(self, directory: str | Path, max_shard_size: int | None = None) -> Path:
        """Write config.json + model.safetensors (sharded above max_shard_size bytes) for transformers."""
        from .hf_io import save_pretrained
        return save_pretrained(self, directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "GPTNeo":
        """Load a directory written by save_pretrained or by transformers (safetensors preferred)."""
        from .hf_io import load_pretrained
        return load_pretrained(directory, map_location=map_location, dtype=dtype)
