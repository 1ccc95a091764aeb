"""Sizing arithmetic for GPT-Neo pre-training (`neo plan`): parameters, FLOPs, memory per GPU, throughput.

Pure arithmetic on a `GPTNeoConfig` (torch is only used to build a meta-device model for
`GPTNeo.flops_per_token`, so the FLOP count is the trainer's MFU numerator). Bytes, not GiB, throughout.

Notation: B micro-batch rows, T tokens per row, d hidden size, L layers, H heads, I MLP width (4d),
V vocabulary, P position rows, W local window, N parameters (tied wte/lm_head counted once), G GPUs.
a = bytes of a matmul output: 4 in fp32, 2 under bf16 autocast. f = 4: LayerNorm inputs (the residual
stream), softmax and cross-entropy stay fp32 under autocast.

Parameters: N = V*d + P*d + L*(4d^2 + 2dI + I + 6d) + 2d (q/k/v without bias; out_proj, c_fc, c_proj
with bias; two LayerNorms per block and ln_f). Non-embedding: N - (V + P)*d. FLOPs per token:
GPTNeo.flops_per_token = 6*(N - P*d) + 12 * sum over layers of H * head_dim * T_eff (T_eff = min(W, T) on
local layers).

Saved for backward per block (eager PyTorch, what this implementation keeps; dropout 0 as in every preset):
    ln_1 input (residual)                f*BTd       ln_2 input (residual)          f*BTd
    ln_1 output (q/k/v input)            a*BTd       ln_2 output (c_fc input)       a*BTd
    q, k, v (one fused projection)      3a*BTd       c_fc output (gelu input)       a*BTI
    attention output                     a*BTd       gelu output (c_proj input)     a*BTI
    attention logsumexp (fp32)           4*BHT       LayerNorm mean and rstd        16*BT
  = (2f + 6a)*BTd + 2a*BTI + 4BHT + 16BT.
No B*H*T*T probabilities are stored: global layers use SDPA's causal kernel (flash on CPU and CUDA) and
local layers FlexAttention (CUDA) or the chunked kernel (CPU); all keep only output + logsumexp. The chunked
kernel (T > W, Tp = T rounded up to a multiple of W) also keeps its per-chunk outputs a*B*Tp*d and the
query blocks and key/value block pairs 5a*B*(Tp - W)*d. The fused q/k/v projection saves its
concatenated weight, 3d^2 elements per layer, as a copy (fp32, or bf16 under autocast).
Head: ln_f input f*BTd, its output a*BTd, ids and targets 16*BT, and with the trainer's fused head + loss
(neo_model.fused, the default) the gradients it computes in the forward pass, d h 4*BTd and d W 4*Vd, while
one chunk of CHUNK_ROWS rows holds its fp32 logits, log-probabilities and one more chunk-sized buffer
(12*CHUNK_ROWS*V transient, measured: the log-softmax's temporary); with
full logits (`fused_head=False`, train.z_loss) fp32 log-probabilities 4*BTV (the logits themselves are
dropped before backward).

Peak of a step (gradients held: gradient accumulation, as in every multi-micro-batch step):
  static + max(head phase, layer phase), where
  head phase  = all blocks' saved tensors + head + its transient (fused: one chunk's 12*CHUNK_ROWS*V;
                full logits: 8*BTV in cross-entropy backward, the log-probabilities' gradient and the
                logits' gradient, fp32, while the log-probabilities are still held);
  layer phase = all blocks' saved tensors + f*BTd + a*BTI + 4dI (the residual's gradient, and at gelu's
                backward one more a*BTI: its input's gradient, while its output's is still held and
                c_proj's saved input already freed; plus one weight gradient before accumulation).
With activation checkpointing per block, each block keeps only its input (f*BTd; 2*BTd under FSDP2,
which hands blocks bf16 inputs) and backward recomputes one block at a time: the head phase holds the
block inputs + head + 8*BTV, the layer phase the block inputs + one block's saved tensors + transients.

Static memory (per GPU):
  fp32 (the CPU reference): weights 4N, gradients 4N, AdamW moments 8N, optimizer-step transients
      (single-tensor AdamW on CPU: two temporaries of the largest parameter, 8*max);
  DDP, bf16 autocast (the trainer on CUDA): fp32 weights 4N (the master copy), fp32 gradients 4N, DDP's
      gradient buckets 4N (gradient_as_bucket_view=False, the default; none on one GPU), AdamW moments
      8N, and the bf16 copies of every matmul weight that autocast makes and backward holds,
      2*(L*(4d^2 + 2dI) + V*d) (with checkpointing they live only until the end of the forward's autocast
      region, which is also counted in full: conservative);
  FSDP2 full sharding, bf16 compute / fp32 reduce (neo_model.parallel.shard): weights, gradients and
      moments 16N/G; the root (wte, wpe, ln_f; not resharded after forward) unsharded in bf16,
      2*((V + P)*d + 2d); gather/reduce buffers 10 bytes per block parameter (current and prefetched
      block in bf16, one block's bf16 gradient and its fp32 reduce-scatter copy; counted at every phase,
      though no block is gathered during the cross-entropy backward: conservative); the concatenated q/k/v
      weights 6d^2 per layer; and, with gradient accumulation (set_requires_gradient_sync(False) on all but
      the last micro-batch), the unsharded fp32 gradients FSDP2 accumulates between syncs, 4N.
Not counted: the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation (`neo plan` keeps a
headroom for them), torch.compile's different buffer choices, and z-loss's extra log-sum-exp.
Checked against measured peaks of live tensors on CPU (tests/neo_model/test_neo_sizing.py: fp32, bf16
autocast, FSDP2 over two gloo processes, with and without checkpointing: all within 5%); the CUDA-only
parts (FlexAttention, fused AdamW, NCCL buffers) are not measured there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import GPTNeoConfig
from .fused import CHUNK_ROWS

STRATEGIES = ("single", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")
LOCAL_KERNELS = ("fused", "chunked")
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM datasheet (REFERENCE section 4)
GiB = 2 ** 30


def param_counts(c: GPTNeoConfig) -> dict[str, int]:
    """Parameter counts: total (tied wte once), embedding (wte + wpe), non-embedding, per block."""
    d, I = c.hidden_size, c.inner_size
    block = 4 * d * d + 2 * d * I + I + 6 * d
    embedding = (c.vocab_size + c.max_position_embeddings) * d
    total = embedding + c.num_layers * block + 2 * d
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "block": block,
            "largest": max(c.vocab_size * d, d * I, c.max_position_embeddings * d)}


def flops_per_token(c: GPTNeoConfig, seq_len: int) -> int:
    """Training FLOPs per token from `GPTNeo.flops_per_token` (the trainer's MFU numerator)."""
    from .model import GPTNeo

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost worth mentioning
        model = GPTNeo(c)
    return model.flops_per_token(seq_len)


def _layer_saved(c: GPTNeoConfig, B: int, T: int, a: int, kind: str, local_kernel: str) -> int:
    """Bytes one block saves for backward (without the q/k/v weight copy)."""
    d, I, f = c.hidden_size, c.inner_size, 4
    n = (2 * f + 6 * a) * B * T * d + 2 * a * B * T * I + 4 * B * c.num_heads * T + 16 * B * T
    W = c.window_size
    if kind == "local" and local_kernel == "chunked" and T > W:
        Tp = math.ceil(T / W) * W
        n += a * B * Tp * d + 5 * a * B * (Tp - W) * d
    return n


def _head_saved(c: GPTNeoConfig, B: int, T: int, a: int, fused: bool) -> int:
    if fused:  # neo_model.fused: d loss / d h and d loss / d W, fp32, computed in the forward pass
        return (4 + a) * B * T * c.hidden_size + 4 * B * T * c.hidden_size + 4 * c.vocab_size * c.hidden_size \
            + 16 * B * T + 8 * B * T
    return (4 + a) * B * T * c.hidden_size + 4 * B * T * c.vocab_size + 16 * B * T + 8 * B * T


@dataclass
class Memory:
    """Bytes per GPU at the peak of a training step, by component (`parts`), and where the peak is."""

    parts: dict[str, int] = field(default_factory=dict)
    phase: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def training_memory(c: GPTNeoConfig, micro_batch: int, seq_len: int, *, strategy: str = "ddp",
                    gpus: int = 1, precision: str = "bf16", checkpointing: bool = False, accum: int = 2,
                    local_kernel: str = "fused", fused_head: bool = True) -> Memory:
    """Peak bytes per GPU of one training micro-step at `micro_batch` rows of `seq_len` tokens.

    strategy: "single" (one process), "ddp" or "fsdp" (full sharding over `gpus`); precision: "fp32"
    (everything fp32, the CPU path) or "bf16" (autocast / FSDP2 bf16 compute, fp32 master state);
    accum: micro-batches per optimizer step (FSDP2 keeps unsharded gradients between syncs when > 1);
    local_kernel: "fused" (FlexAttention on CUDA) or "chunked" (the CPU kernel); fused_head: the trainer's
    fused output head + loss (neo_model.fused; False = full logits, as with train.z_loss). See the module
    docstring.
    """
    if strategy not in STRATEGIES or precision not in PRECISIONS or local_kernel not in LOCAL_KERNELS:
        raise ValueError(f"strategy in {STRATEGIES}, precision in {PRECISIONS}, local_kernel in {LOCAL_KERNELS}")
    if micro_batch < 0 or seq_len <= 0 or gpus <= 0:
        raise ValueError("micro_batch >= 0, seq_len > 0 and gpus > 0 required")
    B, T, d, I, L, V = micro_batch, seq_len, c.hidden_size, c.inner_size, c.num_layers, c.vocab_size
    a = 4 if precision == "fp32" else 2
    counts = param_counts(c)
    N = counts["total"]
    sharded = strategy == "fsdp"
    shard = gpus if sharded else 1
    p: dict[str, int] = {
        "weights": 4 * N // shard,
        "gradients": 4 * N // shard,
        "ddp_buckets": 4 * N if strategy == "ddp" and gpus > 1 else 0,
        "adamw_moments": 8 * N // shard,
    }
    qkv_copy = 3 * d * d * a  # the concatenated q/k/v weight the fused projection saves
    copies_layers = 1 if checkpointing else L
    if sharded:
        gathered = a  # FSDP2 gathers parameters in the compute dtype
        reduce_copy = 4 if a != 4 else 0  # bf16 gradients cast to fp32 for the reduce-scatter
        p["weight_copies"] = copies_layers * qkv_copy + a * ((V + c.max_position_embeddings) * d + 2 * d)
        p["fsdp_buffers"] = (2 * gathered + a + reduce_copy) * counts["block"]
        p["fsdp_unsharded_grads"] = 4 * N if accum > 1 else 0
    elif a == 2:  # autocast's bf16 copies of every matmul weight, held by backward
        p["weight_copies"] = 2 * (L * (4 * d * d + 2 * d * I) + V * d)
    else:
        p["weight_copies"] = copies_layers * qkv_copy
    kinds = c.attention_layers
    f = 4
    head = _head_saved(c, B, T, a, fused_head)
    head_transient = 12 * min(B * T, CHUNK_ROWS) * V if fused_head else 8 * B * T * V
    layer_transient = f * B * T * d + a * B * T * I + 4 * d * I
    if checkpointing:
        inputs = L * (2 if sharded and a == 2 else f) * B * T * d
        one_block = max(_layer_saved(c, B, T, a, k, local_kernel) for k in set(kinds))
        phases = {"cross-entropy backward": (inputs + head, head_transient),
                  "block recompute + backward": (inputs + one_block, layer_transient)}
    else:
        blocks = sum(_layer_saved(c, B, T, a, k, local_kernel) for k in kinds)
        phases = {"cross-entropy backward": (blocks + head, head_transient),
                  "last block backward": (blocks + f * B * T * d, layer_transient)}
    phase = max(phases, key=lambda k: sum(phases[k]))
    p["activations"], p["transient"] = phases[phase]
    if precision == "fp32":  # single-tensor AdamW on CPU: two temporaries of one parameter at a time
        step = 8 * counts["largest"]
        if step > sum(phases[phase]):
            phase, p["activations"], p["transient"] = "optimizer step", 0, step
    return Memory(parts=p, phase=phase)


def max_micro_batch(c: GPTNeoConfig, seq_len: int, budget_bytes: float, rows_per_gpu: int | None = None,
                    **kwargs) -> int:
    """Largest micro-batch whose peak fits `budget_bytes` (0: not even one row). With `rows_per_gpu`, only
    its divisors count (the trainer splits each GPU's rows into equal micro-batches, accumulating
    rows_per_gpu / micro-batch of them); otherwise any size, assuming gradient accumulation."""
    def fits(b: int, accum: int) -> bool:
        return training_memory(c, b, seq_len, accum=accum, **kwargs).total <= budget_bytes

    if rows_per_gpu:
        return max((b for b in range(1, rows_per_gpu + 1) if rows_per_gpu % b == 0 and fits(b, rows_per_gpu // b)),
                   default=0)
    lo, hi = 0, 1 << 20  # memory grows with the micro-batch: bisect for the last size that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid, 2) else (lo, mid - 1)
    return lo


def throughput(flops_token: float, gpus: int, mfu: float, peak_flops: float, tokens: float) -> dict[str, float]:
    """Job tokens/s at `mfu` of `peak_flops` per GPU, and the days `tokens` take."""
    per_gpu = mfu * peak_flops / flops_token
    rate = per_gpu * gpus
    return {"tokens_per_s": rate, "tokens_per_s_per_gpu": per_gpu, "days": tokens / rate / 86400}
