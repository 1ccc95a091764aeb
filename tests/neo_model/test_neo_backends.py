"""Attention backends: sdpa band mask, chunked local attention and FlexAttention agree with a reference;
the chunked path's memory grows linearly with the sequence length."""

import ctypes
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neo_model import GPTNeo, GPTNeoConfig
from neo_model.attention import attention_mask, chunked_local_attention, flex_usable

# T = 45 > window 8 and not a multiple of it: covers the first block, full blocks and the padded tail.
CFG = dict(vocab_size=256, max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=2, window_size=8,
           bos_token_id=255, eos_token_id=255)
T = 45


def reference_attention(q, k, v, n_head, window):
    """Naive softmax(q k^T + mask) v per head, unscaled scores, as REFERENCE.md defines GPT-Neo."""
    B, T, C = q.shape
    qh, kh, vh = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2)
    scores = scores.masked_fill(~attention_mask(0, T, T, window), float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(B, T, C)


@pytest.mark.parametrize("T,W", [(45, 8), (64, 16), (10, 16), (17, 4)])
def test_chunked_local_attention_matches_reference_with_gradients(T, W):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, T, 16, generator=g, requires_grad=True) for _ in range(3))
    y = chunked_local_attention(q, k, v, 2, W)
    grads = torch.autograd.grad(y.pow(2).sum(), (q, k, v))
    ref = reference_attention(q, k, v, 2, W)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    assert (y - ref).abs().max().item() < 1e-5
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < 1e-4


def _model(backend):
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig(**CFG), attn_backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial biases and LayerNorm terms
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_all_backends_agree_in_logits_loss_and_gradients():
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(ids, -1, dims=1)
    results = {}
    for backend in ("sdpa", "chunked", "auto"):
        model = _model(backend)
        logits, loss = model(ids, targets)
        loss.backward()
        results[backend] = (logits.detach(), loss.item(), model.transformer.h[1].attn.attention.q_proj.weight.grad)
    ref_logits, ref_loss, ref_grad = results["sdpa"]
    for backend, (logits, loss, grad) in results.items():
        assert (logits - ref_logits).abs().max().item() < 1e-5, backend
        assert abs(loss - ref_loss) < 1e-6, backend
        assert (grad - ref_grad).abs().max().item() < 1e-5, backend


def test_flex_backend_agrees_or_falls_back():
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    ref = _model("sdpa")
    flex = _model("flex")
    cpu = torch.device("cpu")
    # With autograd on, CPU FlexAttention (torch 2.13) has no backward: the model falls back to chunked.
    assert flex.local_impl(cpu) == "chunked"
    with torch.no_grad():
        if not flex_usable(cpu, needs_grad=False):
            pytest.skip("torch.nn.attention.flex_attention is not importable in this torch")
        assert flex.local_impl(cpu) == "flex"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": expected on CPU
            out = flex(ids)[0]
        assert (out - ref(ids)[0]).abs().max().item() < 1e-5
    with torch.enable_grad():
        loss = flex(ids, ids)[1]  # runs through the fallback, with gradients
        loss.backward()


def test_backend_is_validated_and_auto_picks_per_device():
    model = _model("auto")
    assert model.local_impl(torch.device("cpu")) in ("chunked", "sdpa")
    with pytest.raises(ValueError, match="attn_backend"):
        model.attn_backend = "magic"


# ---- memory -------------------------------------------------------------------------------------------

class _MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes currently allocated through glibc malloc (heap + mmapped chunks): torch's CPU allocator."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakAllocation(TorchDispatchMode):
    """Largest malloc'd bytes above the starting point, sampled after every aten op (inputs excluded)."""

    def __enter__(self):
        self.base = _malloc_in_use()
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _malloc_in_use() - self.base)
        return out


def _peak_bytes(T, W=32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, T, 64, generator=g, requires_grad=True) for _ in range(3))
    with _PeakAllocation() as tracker:
        chunked_local_attention(q, k, v, 4, W).sum().backward()
    return tracker.peak


def test_chunked_attention_memory_grows_linearly():
    try:
        _malloc_in_use()
    except (OSError, AttributeError):
        pytest.skip("glibc mallinfo2 unavailable: cannot count allocations deterministically")
    _peak_bytes(256)  # warm-up: thread pools and allocator arenas
    small = min(_peak_bytes(256) for _ in range(2))
    large = min(_peak_bytes(1024) for _ in range(2))
    # Dense attention would grow ~16x (scores T x T); chunked stores O(T * W).
    assert small > 0 and large <= 4.5 * small, (small, large)
