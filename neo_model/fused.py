"""Fused output head + cross-entropy: the loss of `lm_head(h)` without materialising the (B*T, V) logits.

The plain path (`F.cross_entropy(lm_head(h))`) writes the full logits, a full log-softmax and, in
backward, a full gradient of the logits: three tensors of B*T*V floats (128 MiB each at 4 x 1024 tokens
and vocabulary 8192). Each is larger than glibc's largest mmap threshold, so every step also pays the
page faults of fresh allocations, and the log-softmax backward kernel alone took ~0.45 s per step of the
CPU bench shape. Here the rows go in chunks: for each chunk the forward computes its logits, its
log-softmax and loss, and (when a gradient is wanted) right away the gradient of the mean loss with
respect to the chunk's logits, then the chunk's share of d loss / d h and d loss / d W. Backward only
scales those by the incoming gradient. Same matmuls as the plain path, O(chunk * V) extra memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ROWS = 512  # rows per chunk: 512 x 8192 fp32 logits = 16 MiB, cache-sized on the bench box


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        # mean over the non-ignored rows (NaN when there are none, as F.cross_entropy gives)
        denom = count.to(torch.float32) if reduction == "mean" else torch.ones((), device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.size(0), chunk):
            hc = h[start:start + chunk]
            tc, vc = targets[start:start + chunk], valid[start:start + chunk]
            logits = F.linear(hc, weight).float()  # (n, V); bf16 under autocast, fp32 softmax
            logp = F.log_softmax(logits, dim=-1)
            del logits
            tgt = torch.where(vc, tc, 0).unsqueeze(1)
            total = total + (logp.gather(1, tgt).squeeze(1) * vc).sum().neg()
            if need_h or need_w:
                scale = (vc / denom).unsqueeze(1)  # d loss / d nll of each row (0 where ignored)
                g = logp.exp_().mul_(scale)  # softmax * scale, in place of the log-softmax
                g.scatter_add_(1, tgt, -scale)  # minus the one-hot target
                if not torch.is_autocast_enabled(h.device.type):
                    g = g.to(weight.dtype)  # (autocast casts the matmul inputs itself)
                if need_h:
                    grad_h[start:start + chunk] = torch.mm(g, weight).to(h.dtype)
                if need_w:
                    grad_w += torch.mm(g.t(), hc)
        loss = total / denom
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy of logits = h @ weight.T against targets (ignore_index -100), "mean" or "sum".

    h: (N, C), weight: (V, C), targets: (N,) int64. Equal to
    `F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100, reduction=reduction)` up to
    fp32 summation order, for the value and both gradients.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return _LinearCrossEntropy.apply(h, weight, targets, reduction, chunk)
