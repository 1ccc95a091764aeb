"""One-command GPU check of training (issue 7): 125M tokens/s and MFU, and an FSDP2 sanity check that
needs one GPU only.

    python benchmarks/bench_gpu_train.py             # lent GPU: 125M, bf16 autocast + TF32, eager
    python benchmarks/bench_gpu_train.py --compile   # also the torch.compile'd model
    .venv/bin/python benchmarks/bench_gpu_train.py --smoke   # CPU, debug sizes, gloo (make bench-smoke)

It needs torch and safetensors only (the device machine has no pydantic, Prefect or MLflow): the model
is `neo_model.GPTNeo`, the optimizer `tasks.train.maths.make_optimizer` (fused AdamW, decay on matrices),
the FLOPs `GPTNeo.flops_per_token` (REFERENCE section 4, local layers at their window) and the peak from
`tasks.train.maths.PEAK_FLOPS` for the card's name. Part 1 times forward + backward + AdamW step at the
125M shape (seq 2048, bf16 autocast, TF32 matmuls) on random tokens. Part 2 runs FSDP2 (`neo_model.parallel`:
fully_shard per block + root, bf16 parameters in compute, fp32 reduction) in a one-process NCCL group
next to an unsharded copy under bf16 autocast on the same batches and checks that the loss curves
agree, then that the consolidated checkpoint (gathered on save) loads exactly into a plain model and
back into a sharded one (weights and AdamW state). The full training loop on GPUs (`train.nproc`,
`train.parallel: fsdp`) needs the project's dependencies; see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from the source tree as well

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from neo_model import GPTNeo, GPTNeoConfig  # noqa: E402
from neo_model.checkpoint import load_checkpoint, save_checkpoint, training_state  # noqa: E402
from neo_model.parallel import full_tensor, shard  # noqa: E402
from tasks.train.maths import make_optimizer, peak_flops  # noqa: E402

OPT = SimpleNamespace(lr=6e-4, weight_decay=0.1, peak_flops=None)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(mcfg: GPTNeoConfig, batch: int, seq: int, steps: int, warmup: int, device: torch.device,
               compile: bool) -> dict:
    """tokens/s and MFU of forward + backward + fused AdamW step on one fixed random batch."""
    torch.manual_seed(0)
    net = GPTNeo(mcfg).to(device).train()
    opt = make_optimizer(net, OPT, device)
    fwd = torch.compile(net) if compile else net
    x = torch.randint(0, mcfg.vocab_size, (batch, seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one() -> torch.Tensor:
        with _autocast(device):
            _, loss = fwd(x, targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = one()
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one()
    _sync(device)
    dt = time.perf_counter() - t0
    tps = steps * batch * seq / dt
    fpt = net.flops_per_token(seq)
    peak = peak_flops(OPT, device)
    return {"compile": compile, "params": net.num_parameters(), "batch": batch, "seq_len": seq,
            "steps": steps, "step_s": dt / steps, "tokens_per_s": tps, "flops_per_token": fpt,
            "mfu": tps * fpt / peak if peak else None, "peak_flops": peak, "warmup_s": warm_s,
            "final_loss": float(loss.detach()),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_sanity(mcfg: GPTNeoConfig, batch: int, seq: int, steps: int, device: torch.device) -> dict:
    """FSDP2 in a one-process group against an unsharded copy; consolidated checkpoint round trip."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    torch.manual_seed(1)
    plain = GPTNeo(mcfg).to(device).train()
    sharded = shard(copy.deepcopy(plain), 1, device, bf16=device.type == "cuda")
    opts = [make_optimizer(m, OPT, device) for m in (plain, sharded)]
    gen = torch.Generator().manual_seed(2)
    losses: dict[str, list[float]] = {"plain": [], "fsdp": []}
    for _ in range(steps):
        x = torch.randint(0, mcfg.vocab_size, (batch, seq), generator=gen).to(device)
        for name, m, opt in (("plain", plain, opts[0]), ("fsdp", sharded, opts[1])):
            with _autocast(device):
                _, loss = m(x, targets=x)
            loss.backward()
            full_tensor(torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses["plain"], losses["fsdp"]))
    tol = 3e-2 if device.type == "cuda" else 1e-5  # bf16 parameters in compute vs autocast

    weights, optim = training_state(sharded, opts[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp), steps, mcfg, weights, optim, {"loader": None}, keep=1)
        back_plain = GPTNeo(mcfg).to(device)
        opt_plain = make_optimizer(back_plain, OPT, device)
        load_checkpoint(path, back_plain, opt_plain)
        back_sharded = shard(GPTNeo(mcfg).to(device), 1, device, bf16=device.type == "cuda")
        opt_sharded = make_optimizer(back_sharded, OPT, device)
        load_checkpoint(path, back_sharded, opt_sharded, rank=0)
    again, again_optim = training_state(back_sharded, opt_sharded)
    exact_plain = all(torch.equal(back_plain.state_dict()[k].cpu(), weights[k]) for k in weights)
    exact_sharded = all(torch.equal(again[k], weights[k]) for k in weights)
    exact_optim = all(torch.equal(again_optim["state"][i][n].cpu(), optim["state"][i][n].cpu())
                      for i in optim["state"] for n in optim["state"][i])
    exact_plain_optim = all(torch.equal(opt_plain.state_dict()["state"][i][n].cpu(), optim["state"][i][n].cpu())
                            for i in optim["state"] for n in optim["state"][i])
    dist.destroy_process_group()
    ok = rel <= tol and exact_plain and exact_sharded and exact_optim and exact_plain_optim
    return {"ok": ok, "losses": losses, "max_rel_loss_diff": rel, "tolerance": tol,
            "checkpoint_into_plain_exact": exact_plain, "checkpoint_into_fsdp_exact": exact_sharded,
            "optimizer_round_trip_exact": exact_optim and exact_plain_optim}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, debug sizes: check the script itself")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd model")
    ap.add_argument("--batch", type=int, default=8, help="rows of 2048 tokens per step (125M)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        device, preset, vocab, seq, batch, steps, warmup = torch.device("cpu"), "debug", 512, 64, 2, 3, 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
            return 2
        device, preset, vocab, seq, batch, steps, warmup = (torch.device("cuda", 0), "125m", 50257, 2048,
                                                            args.batch, args.steps, 5)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mcfg = GPTNeoConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=max(seq, 128))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "preset": preset,
            "gpus": torch.cuda.device_count()}
    print(json.dumps(info), flush=True)
    results = {"info": info, "throughput": []}
    for comp in [False, True] if args.compile else [False]:
        r = throughput(mcfg, batch, seq, steps, warmup + (5 if comp else 0), device, comp)
        results["throughput"].append(r)
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a (no peak for this device)"
        print(f"{preset} {'compiled' if comp else 'eager'}: {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['step_s'] * 1e3:.1f} ms/step (B {batch} x T {seq}), MFU {mfu}, peak memory "
              f"{r['peak_memory_gib'] or 0:.1f} GiB", flush=True)
    small = GPTNeoConfig.from_preset("debug" if args.smoke else "125m", vocab_size=vocab,
                                     max_position_embeddings=max(seq, 128))
    sanity = fsdp_sanity(small, 2, min(seq, 512), 4, device)
    results["fsdp_sanity"] = sanity
    print(f"FSDP2 sanity (one process): {'OK' if sanity['ok'] else 'FAILED'}, max relative loss "
          f"difference {sanity['max_rel_loss_diff']:.2e} (tolerance {sanity['tolerance']:g}); "
          f"checkpoint exact into plain {sanity['checkpoint_into_plain_exact']}, into FSDP "
          f"{sanity['checkpoint_into_fsdp_exact']}, optimizer {sanity['optimizer_round_trip_exact']}")
    print("RESULT " + json.dumps(results))
    return 0 if sanity["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
