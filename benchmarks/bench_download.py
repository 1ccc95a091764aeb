"""Download stage benchmark: transfer throughput against curl, and RSS while streaming a big shard.

1. Transfer: the same files from one local HTTP server (127.0.0.1) fetched by
   `tasks.download.fetch.fetch` (bytes to a verified file on disk: sha256 checked, renamed, sidecar written)
   (the server is `python -m http.server` in its own process)
   and by plain `curl -o` (no verification), one file at a time and 4 at a time (`curl -Z`),
   alternating rounds; ratio = ours / curl throughput, the median of per-round ratios (curl
   and ours back to back in each round, so both see the same load); best rounds also shown.
2. Memory: a generated .jsonl.zst shard (500 MB compressed; --smoke: 2 MB) streamed through the whole
   stage (`run_download`: decompress, parse, re-shard, manifest) in a child process; reported is
   peak RSS (ru_maxrss) minus the child's RSS just before the stage started (after imports).

    .venv/bin/python benchmarks/bench_download.py            # full run (a few minutes)
    .venv/bin/python benchmarks/bench_download.py --smoke    # seconds, tiny sizes
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.download.fetch import RetryPolicy, fetch  # noqa: E402

CURL = shutil.which("curl") or "/usr/bin/curl"


def serve(directory: Path) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` in its own process: the server must not share our GIL (curl does
    not share it either)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(directory)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def _ours(urls: list[str], out: Path, workers: int) -> None:
    policy = RetryPolicy(retries=3, backoff_s=0.1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda u: fetch(u, out / u.rsplit("/", 1)[1], policy=policy), urls))


def _curl(urls: list[str], out: Path, workers: int) -> None:
    cmd = [CURL, "-sSf", "--no-progress-meter"]
    if workers > 1:
        cmd += ["-Z", "--parallel-max", str(workers)]
    for u in urls:
        cmd += ["-o", str(out / u.rsplit("/", 1)[1]), u]
    subprocess.run(cmd, check=True)


def bench_transfer(n_files: int, file_mb: int, rounds: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-dl-"))
    try:
        src = tmp / "src"
        src.mkdir()
        block = os.urandom(1 << 20)
        for i in range(n_files):
            with open(src / f"f{i:02d}.bin", "wb") as f:
                for j in range(file_mb):
                    f.write(block[j % 7:] + block[: j % 7])
        total = n_files * file_mb * (1 << 20)
        server, base = serve(src)
        urls = [f"{base}/f{i:02d}.bin" for i in range(n_files)]
        best: dict[str, float] = {}
        ratios: dict[int, list[float]] = {1: [], 4: []}
        for _ in range(rounds):
            for workers in (1, 4):
                times = {}
                for name, fn in (("curl", _curl), ("ours", _ours)):  # back to back: same load
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    t0 = time.perf_counter()
                    fn(urls, out, workers)
                    times[name] = dt = time.perf_counter() - t0
                    got = sum(p.stat().st_size for p in out.glob("*.bin"))
                    assert got == total, (name, got, total)
                    key = f"{name}_x{workers}"
                    best[key] = min(best.get(key, float("inf")), dt)
                ratios[workers].append(times["curl"] / times["ours"])
        server.terminate()
        server.wait()
        res = {"files": n_files, "file_mb": file_mb, "rounds": rounds, "total_mb": total / 1e6}
        for key, dt in best.items():
            res[f"{key}_MBps_best"] = round(total / dt / 1e6, 1)
        for w in (1, 4):
            res[f"ratio_x{w}_best"] = round(best[f"curl_x{w}"] / best[f"ours_x{w}"], 3)
            res[f"ratio_x{w}"] = round(statistics.median(ratios[w]), 3)
            res[f"ratio_x{w}_rounds"] = [round(r, 3) for r in ratios[w]]
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_shard(path: Path, target_bytes: int) -> tuple[int, int]:
    """A Pile-style .jsonl.zst of about `target_bytes` compressed: docs of 1-16 KB of base64 text
    (random, so it barely compresses: the file is big without taking long to generate)."""
    docs = written = 0
    cctx = zstandard.ZstdCompressor(level=1, threads=2)
    with open(path, "wb") as raw, cctx.stream_writer(raw, closefd=False) as out:
        rnd = os.urandom(1 << 22)
        while raw.tell() < target_bytes:
            size = 1024 + (docs * 7919) % 15360
            start = (docs * 104729) % (len(rnd) - size)
            text = base64.b64encode(rnd[start:start + size]).decode()
            line = json.dumps({"text": text, "meta": {"pile_set_name": "bench", "n": docs}}) + "\n"
            written += out.write(line.encode())
            docs += 1
            if docs % 50_000 == 0:
                rnd = os.urandom(1 << 22)
    return docs, path.stat().st_size


_CHILD = """
import json, resource, sys, time
from tasks.core.data_config import CorpusConfig
from tasks.download.stage import run_download
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) * 1024
base = rss()
t0 = time.perf_counter()
r = run_download(CorpusConfig(sources=[sys.argv[1]], max_bytes=None), sys.argv[2])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss_mb": base / 1e6, "peak_rss_mb": peak / 1e6,
                  "growth_mb": (peak - base) / 1e6, "seconds": dt, "counts": r.counts,
                  "shards": r.info.get("shards")}))
"""


def bench_memory(target_bytes: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-dl-mem-", dir="/tmp"))
    try:
        shard = tmp / "big.jsonl.zst"
        t0 = time.perf_counter()
        docs, size = make_shard(shard, target_bytes)
        gen = time.perf_counter() - t0
        env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
        out = subprocess.run([sys.executable, "-c", _CHILD, str(shard), str(tmp / "ws")], cwd=ROOT,
                             env=env, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["counts"]["docs"] == docs, (res, docs)
        res.update({"shard_mb": round(size / 1e6, 1), "docs": docs, "generate_s": round(gen, 1),
                    "stream_MBps_compressed": round(size / res["seconds"] / 1e6, 1)})
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; exits 0 on success")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--file-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--no-memory", action="store_true", help="transfer part only")
    args = ap.parse_args()
    if args.smoke:
        args.files, args.file_mb, args.rounds, args.shard_mb = 2, 1, 1, 2
    transfer = bench_transfer(args.files, args.file_mb, args.rounds)
    print("transfer:", json.dumps(transfer))
    print(f"throughput ours/curl (median of rounds): 1 at a time {transfer['ratio_x1']:.3f}x, "
          f"4 at a time {transfer['ratio_x4']:.3f}x (goal >= 0.8x)")
    if args.no_memory:
        return 0
    memory = bench_memory(args.shard_mb * 1_000_000)
    print("memory:", json.dumps(memory))
    print(f"RSS growth streaming a {memory['shard_mb']} MB .jsonl.zst through the stage: "
          f"{memory['growth_mb']} MB (goal < 200 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
