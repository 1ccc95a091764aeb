"""Model benchmark: our GPTNeo against transformers' GPTNeoForCausalLM, side by side in one run.

CPU (fp32, same threads, same weights, interleaved rounds so load on a shared machine hits both; every
row reports wall and process-CPU seconds side by side, median and best):
  * training step, forward + backward + AdamW, tokens/s             (goal: ours >= 2x HF)
    ours = the trainer's path (fused head + loss, no logits kept); --compile adds ours under
    torch.compile (train.compile: true), its one-time compile reported apart
  * KV-cache greedy generation against HF generate, new tokens/s    (goal: ours >= 2x HF)
    --compile adds generate(compile=True) (one compiled graph per decode step)
  * local-attention backends (sdpa band mask vs chunked) for the CPU `auto` choice (--backends)
  * --profile: torch.profiler tables of ours (what is left)
GPU (--gpu; bf16 autocast, torch.compile, FlexAttention for local layers): forward + backward MFU of
the 125M preset at context 2048, FLOPs per token = GPTNeo.flops_per_token (REFERENCE.md section 4), and
the same for HF when transformers is importable. Runs from the source tree: `PYTHONPATH=. python
benchmarks/bench_model.py --gpu`.

    .venv/bin/python benchmarks/bench_model.py --threads 1 --rounds 5 --compile   # RESULTS.md figures
    .venv/bin/python benchmarks/bench_model.py --smoke    # seconds, tiny sizes (make test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from the source tree as well

import torch  # noqa: E402

from neo_model import GPTNeo, GPTNeoConfig  # noqa: E402

CPU_CONFIG = dict(vocab_size=8192, max_position_embeddings=1024, hidden_size=256, num_layers=4, num_heads=4,
                  window_size=256, bos_token_id=8191, eos_token_id=8191)
SMOKE_CONFIG = dict(vocab_size=512, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                    window_size=16, bos_token_id=511, eos_token_id=511)


def load_hf(directory: Path, **kwargs):
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.GPTNeoForCausalLM.from_pretrained(directory, attn_implementation="eager", **kwargs)
    model.generation_config.eos_token_id = None  # run the full length, as ours does without eos
    model.generation_config.pad_token_id = 0
    return model


CLOCK = time.perf_counter  # --clock cpu: time.process_time, immune to being descheduled on a shared box


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each fn (by --clock), alternating fns round by round after one warm-up call
    each (for a compiled fn: the compile, printed). The other clock goes to OTHER for the report."""
    for name, fn in fns.items():
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        warm = time.perf_counter() - t0
        if warm > 5:
            print(f"  (first call of {name}: {warm:.1f} s wall, {time.process_time() - c0:.1f} s CPU of this "
                  f"process; compile workers are not counted in the latter)")
    times: dict[str, list[float]] = {name: [] for name in fns}
    OTHER.clear()
    OTHER.update({name: [] for name in fns})
    other = time.process_time if CLOCK is time.perf_counter else time.perf_counter
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, o0 = CLOCK(), other()
            fn()
            times[name].append(CLOCK() - t0)
            OTHER[name].append(other() - o0)
    return times


OTHER: dict[str, list[float]] = {}
OTHER_NAME = "CPU"


def report(t: dict[str, list[float]], units: float, unit: str) -> dict[str, float]:
    """Print median/best seconds of both clocks and throughput; return the medians (by --clock)."""
    med = {k: statistics.median(v) for k, v in t.items()}
    for k, v in med.items():
        o = OTHER.get(k) or [float("nan")]
        print(f"  {k:16s} {v:8.3f} s   {units / v:10.0f} {unit}   (best {min(t[k]):.3f} s; {OTHER_NAME} clock "
              f"median {statistics.median(o):.3f} s, best {min(o):.3f} s)")
    return med


def ratio_line(t: dict[str, list[float]], name: str, goal: str) -> None:
    """ours/HF speed ratio by median and by best, on both clocks."""
    o = OTHER
    print(f"  ratio {name}/HF: {statistics.median(t['hf']) / statistics.median(t[name]):.2f}x (median), "
          f"{min(t['hf']) / min(t[name]):.2f}x (best); {OTHER_NAME} clock "
          f"{statistics.median(o['hf']) / statistics.median(o[name]):.2f}x (median), "
          f"{min(o['hf']) / min(o[name]):.2f}x (best)   goal {goal}")


def train_step_fn(model, ids, hf: bool, fwd=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # same optimizer settings for both
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    fwd = model if fwd is None else fwd

    def step():
        if hf:
            loss = model(input_ids=ids, labels=ids).loss  # HF shifts labels itself
        else:
            loss = fwd(ids, targets, return_logits=False)[1]  # the trainer's step_loss without z-loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def cpu(args) -> None:
    torch.set_num_threads(args.threads)
    cfg = GPTNeoConfig(**(SMOKE_CONFIG if args.smoke else CPU_CONFIG))
    B = 2 if args.smoke else 4
    T = cfg.max_position_embeddings
    rounds = 2 if args.smoke else args.rounds
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, config {cfg}")
    torch.manual_seed(0)
    ours = GPTNeo(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = load_hf(Path(tmp))
        hf_gen = load_hf(Path(tmp))  # untouched copies for generation: the train steps move the weights
    ours_gen = GPTNeo(cfg)
    ours_gen.load_state_dict(ours.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    ours.eval(), hf.eval()
    with torch.no_grad():
        diff = (ours(ids)[0] - hf(ids).logits).abs().max().item()
    print(f"same weights: max |logit diff| ours vs HF = {diff:.2e}")
    assert diff < 1e-3, diff

    # -- training step (fresh copies so both optimizers start from the same weights) --
    ours.train(), hf.train()
    steps = {"ours": train_step_fn(ours, ids, hf=False), "hf": train_step_fn(hf, ids, hf=True)}
    if args.compile:
        twin = GPTNeo(cfg)
        twin.load_state_dict(ours.state_dict())
        steps["ours compiled"] = train_step_fn(twin.train(), ids, hf=False, fwd=torch.compile(twin))
    if args.backends:
        for backend in ("sdpa", "chunked"):
            m = GPTNeo(cfg, attn_backend=backend)
            m.load_state_dict(ours.state_dict())
            steps[f"ours[{backend}]"] = train_step_fn(m.train(), ids, hf=False)
    print(f"\ntrain step fwd+bwd+AdamW, B={B} T={T}, {rounds} interleaved rounds (median s/step, tokens/s):")
    t = interleaved(steps, rounds)
    med = report(t, B * T, "tok/s")
    print(f"  ours uses local backend {ours.local_impl(ids.device)!r}")
    ratio_line(t, "ours", ">= 2x")
    if args.compile:
        ratio_line(t, "ours compiled", ">= 2x")
    if args.backends:
        print(f"  chunked vs sdpa-mask local attention (model step): "
              f"{med['ours[sdpa]'] / med['ours[chunked]']:.2f}x")
    if args.profile:
        profile_table("ours train step (eager)", steps["ours"])
        if args.compile:
            profile_table("ours train step (compiled)", steps["ours compiled"])

    # -- generation: greedy, KV cache, full length (the same initial weights in both) --
    ours, hf = ours_gen.eval(), hf_gen.eval()
    P, N = (8, 16) if args.smoke else (args.prompt, args.new_tokens)
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(2))
    outs = {}

    def run_ours():
        outs["ours"] = ours.generate(prompt, N, temperature=0.0)

    def run_ours_compiled():
        outs["ours compiled"] = ours.generate(prompt, N, temperature=0.0, compile=True)

    def run_hf():
        with torch.no_grad():
            outs["hf"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N,
                                     min_new_tokens=N, do_sample=False, use_cache=True)
    F = torch.nn.functional
    weights = [(blk.attn.attention.qkv_weight().detach(), blk.attn.attention.out_proj, blk.mlp.c_fc,
                blk.mlp.c_proj) for blk in ours.transformer.h]
    x1 = torch.randn(B, cfg.hidden_size)

    @torch.no_grad()
    def matmul_floor():
        """Only the weight matmuls of N decode steps (B rows each): the part both implementations share."""
        for _ in range(N):
            for qkv, out, fc, proj in weights:
                F.linear(x1, qkv)
                F.linear(x1, out.weight, out.bias)
                F.linear(F.linear(x1, fc.weight, fc.bias), proj.weight, proj.bias)
            F.linear(x1, ours.lm_head.weight)
    gens = {"ours": run_ours, "hf": run_hf, "matmul floor": matmul_floor}
    if args.compile:
        gens["ours compiled"] = run_ours_compiled
    print(f"\ngreedy generation, KV cache, B={B} prompt {P} + {N} new tokens, {rounds} rounds:")
    t = interleaved(gens, rounds)
    med = report(t, B * N, "new tok/s")
    floor = med["matmul floor"]
    print(f"  weight matmuls alone (memory-bound at batch {B}, identical in both): {floor:.3f} s = "
          f"{floor / med['ours']:.0%} of ours; bound on ours/HF with zero other cost: "
          f"{med['hf'] / floor:.2f}x")
    for name in [k for k in ("ours", "ours compiled") if k in outs]:
        ratio_line(t, name, ">= 2x")
        same = (outs[name] == outs["hf"]).float().mean().item()
        print(f"  {name}: identical tokens to HF {same:.1%} (random weights: near-tied logits may flip)")
    if args.profile:
        profile_table("ours generation (eager)", run_ours)
        if args.compile:
            profile_table("ours generation (compiled)", run_ours_compiled)


def profile_table(title: str, fn, rows: int = 18) -> None:
    from torch.profiler import profile
    with profile() as prof:
        fn()
    print(f"\nprofile: {title} (one call)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def gpu(args) -> None:
    """bf16 forward+backward MFU of the 125M preset at context 2048 on CUDA (ours, then HF if present)."""
    assert torch.cuda.is_available(), "--gpu needs CUDA"
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12
    cfg = GPTNeoConfig.from_preset("125m")
    T, B = 2048, args.gpu_batch
    print(f"torch {torch.__version__}, {name}, peak {args.peak_tflops} TFLOP/s, 125M, T={T}, B={B}")
    torch.manual_seed(0)
    ours = GPTNeo(cfg).to(dev).train()
    print(f"local attention backend: {ours.local_impl(dev)}")
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    flops_tok = ours.flops_per_token(T)

    def measure(label, step, steps):
        for _ in range(3):  # compile + warm-up
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        tps = B * T / dt
        print(f"  {label:10s} {dt * 1e3:8.1f} ms/step  {tps:10.0f} tok/s  MFU {flops_tok * tps / peak:6.1%}")
        return tps

    ours.prepare_flex(T, dev)
    compiled = torch.compile(ours)

    def ours_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, targets)[1]
        loss.backward()
    res = {"ours": measure("ours", ours_step, args.gpu_steps)}
    compiled = ours = None  # free them before the HF model
    torch.cuda.empty_cache()
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        hf = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**cfg.to_hf_dict())).to(dev).train()
        hf_c = torch.compile(hf)

        def hf_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = hf_c(input_ids=ids, labels=ids).loss
            loss.backward()
        res["hf"] = measure("hf", hf_step, args.gpu_steps)
        print(f"  ratio ours/HF tokens/s: {res['ours'] / res['hf']:.2f}x")
    except ImportError:
        print("  transformers not importable here: HF comparison skipped")
    except Exception as exc:  # noqa: BLE001 - report, keep our figure
        print(f"  HF run failed: {type(exc).__name__}: {exc}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; exits 0 on success")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU seconds (use with --threads 1 on a machine shared with other jobs)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--backends", action="store_true", help="also time the sdpa and chunked local backends")
    p.add_argument("--compile", action="store_true",
                   help="also time ours under torch.compile (train step) and generate(compile=True)")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of ours after the timings")
    p.add_argument("--gpu", action="store_true", help="bf16 MFU on CUDA instead of the CPU comparison")
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--gpu-steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    global OTHER_NAME
    OTHER_NAME = "wall" if args.clock == "cpu" else "CPU"
    if args.gpu:
        gpu(args)
    else:
        cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
