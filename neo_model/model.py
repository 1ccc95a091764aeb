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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTNeoConfig

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_new" = GPT-2's tanh approximation
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


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


class KVCache:
    """Keys and values of one layer for incremental decoding: each (B, nh, T_so_far, hs)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, C). mask: None means plain causal over T == T_k, else bool (T, T_k) from the model."""
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, T_k, hs)
        dropout_p = self.attn_dropout if self.training else 0.0
        # scale=1.0: GPT-Neo uses raw q.k scores; the 1/sqrt(hs) lives in the q init instead.
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=1.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.out_proj(y))


class Attention(nn.Module):
    """Holder whose only job is the `attn.attention.*` key level of HF checkpoints."""

    def __init__(self, config: GPTNeoConfig, attention_type: str):
        super().__init__()
        self.attention = SelfAttention(config, attention_type)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        return self.attention(x, mask, cache)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPTNeo(nn.Module):
    """GPT-Neo causal language model; `forward(ids, targets)` returns (logits, loss)."""

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),
            wpe=nn.Embedding(config.max_position_embeddings, config.hidden_size),
            drop=nn.Dropout(config.embed_dropout),
            h=nn.ModuleList([Block(config, kind) for kind in config.attention_layers]),
            ln_f=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in every released GPT-Neo
        # Local band masks by (T, window, device); a plain dict, so it is neither a parameter nor in state_dict.
        self._mask_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._init_weights()

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

    def _local_mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Band mask for a full causal pass of length T; None when the window covers everything."""
        if T <= self.config.window_size:
            return None  # local == causal here, so SDPA can use its fast is_causal path
        if torch.compiler.is_compiling():
            return attention_mask(0, T, T, self.config.window_size, device)  # no Python-side caching
        key = (T, self.config.window_size, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = attention_mask(0, T, T, self.config.window_size, device)
        return self._mask_cache[key]

    def _hidden(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for tokens at positions start_pos .. start_pos+T-1."""
        B, T = input_ids.size()
        T_k = start_pos + T
        if T_k > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T_k} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        device = input_ids.device
        pos = torch.arange(start_pos, T_k, device=device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))  # (B, T, C)
        if start_pos == 0:
            masks = {"global": None, "local": self._local_mask(T, device)}
        else:
            # Decoding against a cache: queries are the last T of T_k positions, so build explicit masks
            # (SDPA's is_causal aligns top-left, which is wrong when T != T_k).
            masks = {"global": attention_mask(start_pos, T, T_k, None, device),
                     "local": attention_mask(start_pos, T, T_k, self.config.window_size, device)}
        for i, block in enumerate(self.transformer.h):
            x = block(x, masks[block.attention_type], caches[i] if caches is not None else None)
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, targets: (B, T) int64. Returns logits (B, T, V) and the loss (None without targets).

        The loss is cross-entropy with ignore_index=-100: a scalar for reduction "mean"/"sum", per-token
        NLL (B, T) for "none" (0 at ignored positions).
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        logits = self.lm_head(self._hidden(input_ids))  # (B, T, V)
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

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to input_ids (B, T); returns (B, T + n).

        temperature 0 means greedy; top_k None or 0 samples from the full distribution. With
        eos_token_id, a finished row is padded with eos and generation stops early once every row has
        finished. The context is cropped to max_position_embeddings; a
        KV cache is used while the whole sequence still fits (positions shift once cropping starts).
        """
        was_training = self.training
        self.eval()
        max_pos = self.config.max_position_embeddings
        idx = input_ids
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        caches: list[KVCache] | None = None
        try:
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= max_pos:
                    if caches is None:  # prefill with the whole prompt
                        caches = [KVCache() for _ in self.transformer.h]
                        h = self._hidden(idx, caches, 0)
                    else:  # only the newest token; earlier keys/values come from the cache
                        h = self._hidden(idx[:, -1:], caches, idx.size(1) - 1)
                else:
                    caches = None
                    h = self._hidden(idx[:, -max_pos:])
                logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k:  # None or 0 disables the filter, as in HF
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                if eos_token_id is not None:
                    next_id = next_id.masked_fill(finished.unsqueeze(1), eos_token_id)
                    finished |= next_id.squeeze(1) == eos_token_id
                idx = torch.cat([idx, next_id], dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    # ---- checkpoints (HF layout; implemented in hf_io) ----------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors that transformers' GPTNeoForCausalLM can load."""
        from .hf_io import save_pretrained
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "GPTNeo":
        """Load a directory written by save_pretrained or by transformers (safetensors preferred)."""
        from .hf_io import load_pretrained
        return load_pretrained(directory, map_location=map_location, dtype=dtype)
