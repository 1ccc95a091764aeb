"""Orchestration overhead: `neo run -c debug` as a user runs it, against the same stages as plain calls.

    .venv/bin/python benchmarks/bench_overhead.py                      # this checkout, best of 2
    .venv/bin/python benchmarks/bench_overhead.py --rounds 3 --root before=/tmp/base --root after=.
    .venv/bin/python benchmarks/bench_overhead.py --profile /tmp/prof  # + cProfile / -X importtime
    .venv/bin/python benchmarks/bench_overhead.py --smoke              # plain side only, seconds

Per round and per source tree (`--root LABEL=DIR`, run from DIR through PYTHONPATH, so an unpacked
`git archive` of another commit can run beside this checkout with the same venv), interleaved:
1. `neo run -c debug -w <fresh temp workspace>` in a subprocess: wall and CPU seconds (the CLI, the
   Prefect server and the training subprocess, all waited for), split from the run's own records: CLI
   start (process start to the "Starting temporary server" log line, or to the first flow run when
   none is logged), server start (to the pipeline flow run's start in Prefect's database), each
   stage's task run (start to end), orchestration between the task runs (flow runs minus task runs),
   exit (pipeline flow end to process end). The train task is split again with the trainer's own clock
   (manifest `train_wall_s`): the rest is subprocess start, MLflow and export.
2. The same command again in the same workspace: the fully cached rerun.
3. The same stages as plain functions (run_download ... run_register) in one fresh process on a fresh
   workspace, same config (training in its subprocess as the stage does): wall and CPU from outside,
   each stage's seconds from inside.
Overhead = (neo run wall - plain wall) / plain wall, best of the rounds (and the same on CPU seconds).
Timing on a shared 2-core box is noisy: the load average is printed with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download", "clean", "dedup", "tokenize", "train", "evaluate", "register"]
HEAVY = ("prefect", "mlflow", "torch", "pandas")
SERVER_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| prefect - Starting temporary server", re.M)
TRAIN_FIRST = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Task run 'train-[^']*' - training ", re.M)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def env_for(root: Path, work: Path) -> dict:
    env = {**os.environ, "NEO_HOME": str(work / "home"), "PYTHONPATH": str(root)}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        env.pop(var, None)
    return env


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, float, str]:
    """(start epoch, wall s, CPU s of the process and everything it waited for, output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, p0 = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - p0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return t0, wall, cpu, proc.stdout + proc.stderr


def log_epoch(stamp: str, near: float) -> float:
    """A log line's local HH:MM:SS.fff as epoch seconds, on the day of `near`."""
    day = datetime.fromtimestamp(near).date()
    return datetime.combine(day, datetime.strptime(stamp, "%H:%M:%S.%f").time()).timestamp()


def db_epoch(value: str) -> float:
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()


def breakdown(ws: Path, t0: float, wall: float, out: str) -> dict[str, float]:
    """The latest `neo_pipeline` run in the workspace's Prefect database, split into phases (s)."""
    db = sqlite3.connect(f"file:{ws / 'prefect' / 'prefect.db'}?mode=ro", uri=True)
    fid, fstart, fend = db.execute("SELECT id, start_time, end_time FROM flow_run WHERE parent_task_run_id IS NULL "
                                   "ORDER BY created DESC LIMIT 1").fetchone()
    tree, frontier = {fid}, [fid]
    while frontier:  # subflow runs hang off task runs of their parent flow run
        q = ",".join("?" * len(frontier))
        frontier = [r[0] for r in db.execute(
            f"SELECT f.id FROM flow_run f JOIN task_run t ON f.parent_task_run_id = t.id WHERE t.flow_run_id IN ({q})",
            frontier)]
        tree.update(frontier)
    q = ",".join("?" * len(tree))
    tasks = {name.split("-")[0]: (db_epoch(s), db_epoch(e)) for name, s, e in db.execute(
        f"SELECT name, start_time, end_time FROM task_run WHERE flow_run_id IN ({q}) AND start_time IS NOT NULL",
        list(tree)) if name.split("-")[0] in STAGES}
    db.close()
    start, end = db_epoch(fstart), db_epoch(fend)
    m = SERVER_LINE.search(out)
    server_at = log_epoch(m.group(1), t0) if m else start
    row = {"cli start": server_at - t0, "server start": start - server_at}
    row.update({s: tasks[s][1] - tasks[s][0] for s in STAGES if s in tasks})
    row["between tasks"] = (end - start) - sum(row.get(s, 0.0) for s in STAGES)
    row["exit"] = t0 + wall - end
    first = TRAIN_FIRST.search(out)
    if "train" in tasks and first:
        row["train: task start -> first trainer line"] = log_epoch(first.group(1), t0) - tasks["train"][0]
    return row


def train_info(ws: Path) -> dict:
    manifests = sorted((ws / "train").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(manifests[-1].read_text()) if manifests else {}  # info keys sit at the top


def neo_run(root: Path, work: Path, extra: list[str]) -> tuple[dict, dict]:
    """A fresh `neo run -c debug` and its cached rerun in the same workspace."""
    env, ws = env_for(root, work), work / "ws"
    cmd = [sys.executable, "-m", "flows.cli.main", "run", "-c", "debug", "-w", str(ws), *extra]
    load = loadavg()
    t0, wall, cpu, out = timed(cmd, env, work)
    fresh = {"wall": wall, "cpu": cpu, "load": load, **breakdown(ws, t0, wall, out)}
    info = train_info(ws)
    if info.get("train_wall_s") is not None and "train" in fresh:
        fresh["train: trainer's own clock"] = info["train_wall_s"]
    load = loadavg()
    t0, wall, cpu, out = timed(cmd, env, work)
    if "reused outputs   : download, clean, dedup, tokenize, train, evaluate, register" not in out:
        sys.exit(f"the rerun was not fully cached:\n{out[-3000:]}")
    cached = {"wall": wall, "cpu": cpu, "load": load, **breakdown(ws, t0, wall, out)}
    return fresh, cached


def plain(root: Path, work: Path, extra: list[str]) -> dict:
    """The plain-function side in a fresh process (this script's --plain-worker)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", str(work / "plain"), *extra]
    load = loadavg()
    _, wall, cpu, out = timed(cmd, env_for(root, work), work)
    inner = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "cpu": cpu, "load": load, **inner}


def plain_worker(ws: str, sets: list[str]) -> None:
    """Run every stage as a plain function, as the flows wire them; print one JSON line of seconds."""
    t = time.perf_counter()
    from flows.cli.runtime import OFFLINE_DEFAULTS  # the CLI's MLflow settings; no Prefect here

    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from tasks.clean.stage import run_clean
    from tasks.core.config import load_config, redacted_params
    from tasks.dedup.stage import run_dedup
    from tasks.download.stage import run_download
    from tasks.evaluate.stage import run_evaluate
    from tasks.register.stage import run_register
    from tasks.tokenize.stage import run_tokenize
    from tasks.train.stage import run_train

    secs = {"imports": time.perf_counter() - t}
    cfg = load_config("debug", sets)
    r: dict = {}

    def stage(name, fn, *args, **kw):
        t = time.perf_counter()
        r[name] = fn(*args, **kw)
        secs[name] = secs.get(name, 0.0) + time.perf_counter() - t
        return r[name]

    def chain():
        raw = stage("download", run_download, cfg.corpus, ws)
        cleaned = stage("clean", run_clean, cfg.clean, raw, ws)
        deduped = stage("dedup", run_dedup, cfg.dedup, cleaned, ws)
        tokens = stage("tokenize", run_tokenize, cfg.tokenizer, deduped, ws)
        trained = stage("train", run_train, cfg.train, cfg.model, tokens, ws, log=lambda line: None)
        evaluated = stage("evaluate", run_evaluate, cfg.eval, trained, tokens, ws)
        return stage("register", run_register, cfg.registry, evaluated, [tokens, trained],
                     redacted_params(cfg), ws)

    registered = chain()
    secs["train: trainer's own clock"] = r["train"].info.get("train_wall_s") or 0.0
    t = time.perf_counter()
    secs_first = dict(secs)
    for name in STAGES:
        secs.pop(name)
    chain()  # the plain cached rerun: every stage finds its complete directory
    secs_first["cached chain"] = time.perf_counter() - t
    secs_first["not reused"] = [name for name, x in r.items() if not x.reused]
    secs_first["version"] = float(registered.info["version"])
    print(json.dumps(secs_first))


def heavy_imports_of_help(root: Path) -> list[str]:
    """Top-level packages among HEAVY that `neo --help` imports (read from -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli.main", "--help"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    if proc.returncode:
        sys.exit(f"neo --help failed:\n{proc.stderr[-3000:]}")
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return sorted(h for h in HEAVY if h in names)


def profile(root: Path, work: Path, dest: Path) -> None:
    """cProfile of a cached `neo run` (top 30 cumulative) and `-X importtime` of `neo --help` and of
    the pipeline's imports, written to `dest`."""
    import pstats

    dest.mkdir(parents=True, exist_ok=True)
    env, ws = env_for(root, work), work / "ws"
    prof = dest / "cached_run.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "flows.cli.main", "run", "-c", "debug",
                    "-w", str(ws)], env=env, cwd=work, capture_output=True, check=True)
    with open(dest / "cached_run.txt", "w") as f:
        pstats.Stats(str(prof), stream=f).sort_stats("cumulative").print_stats(60)
    for name, code in (("help", "-m flows.cli.main --help"), ("pipeline", "-c import flows.pipeline")):
        flag, rest = code.split(" ", 1)
        p = subprocess.run([sys.executable, "-X", "importtime", flag, *rest.split(" ", 1 if flag == "-c" else 9)],
                           capture_output=True, text=True, env=env, cwd=root)
        (dest / f"importtime_{name}.txt").write_text(p.stderr)
    print(f"profiles in {dest}: cached_run.prof/.txt, importtime_help.txt, importtime_pipeline.txt")


def best(rows: list[dict]) -> dict:
    """Per key, the row value from the round with the lowest wall time (the least disturbed one)."""
    return min(rows, key=lambda r: r["wall"])


def table(title: str, cols: dict[str, dict], keys: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'':<42}" + "".join(f"{label:>16}" for label in cols))
    for k in keys:
        vals = [c.get(k) for c in cols.values()]
        if all(v is None for v in vals):
            continue
        cells = "".join(f"{v:>16}" if isinstance(v, str) else f"{v:>16.2f}" if v is not None else f"{'-':>16}"
                        for v in vals)
        print(f"{k:<42}{cells}")


def smoke() -> int:
    """Plain stages of a shortened debug run (and their cached rerun), and `neo --help`'s imports."""
    with tempfile.TemporaryDirectory(prefix="neo-overhead-") as tmp:
        work = Path(tmp)
        p = plain(ROOT, work, ["--set", "train.max_steps=10", "--set", "eval.max_batches=2", "--set", "eval.samples=0",
                                 "--set", "registry.model_name=overhead-smoke"])
    print(f"plain stages, debug preset at 10 steps: {p['wall']:.1f} s wall, {p['cpu']:.1f} s CPU, load {p['load']}")
    print("  " + ", ".join(f"{s} {p[s]:.2f} s" for s in ["imports", *STAGES]) + f"; cached chain {p['cached chain']:.2f} s")
    heavy = heavy_imports_of_help(ROOT)
    print(f"`neo --help` imports of {', '.join(HEAVY)}: {heavy or 'none'}")
    assert p["version"] == 1.0 and p["not reused"] == [], p
    assert all(p[s] > 0 for s in STAGES), p
    assert heavy == [], f"`neo --help` imports {heavy}"
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", action="append", default=[], help="LABEL=DIR source tree to run (repeatable; "
                    "default: this checkout)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=Path, help="also write cProfile and -X importtime output here")
    ap.add_argument("--smoke", action="store_true", help="plain stages of a 10-step debug run, neo --help's imports")
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value overrides")
    args = ap.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker, args.set)
        return 0
    if args.smoke:
        return smoke()
    roots = dict(r.split("=", 1) for r in args.root) or {"this": str(ROOT)}
    roots = {label: Path(d).resolve() for label, d in roots.items()}
    extra = [a for s in args.set for a in ("--set", s)]
    runs: dict[str, dict[str, list]] = {label: {"fresh": [], "cached": [], "plain": []} for label in roots}
    print(f"{os.cpu_count()} CPUs, load at start {loadavg()}; rounds {args.rounds}; roots "
          + ", ".join(f"{k}={v}" for k, v in roots.items()))
    for i in range(args.rounds):
        for label, root in roots.items():
            with tempfile.TemporaryDirectory(prefix="neo-overhead-") as tmp:
                fresh, cached = neo_run(root, Path(tmp), extra)
                pl = plain(root, Path(tmp), args.set)
                if args.profile and i == args.rounds - 1:
                    profile(root, Path(tmp), args.profile / label)
            for kind, row in (("fresh", fresh), ("cached", cached), ("plain", pl)):
                runs[label][kind].append(row)
            print(f"round {i + 1} {label}: neo run {fresh['wall']:.1f} s wall / {fresh['cpu']:.1f} s CPU "
                  f"(load {fresh['load']}), cached rerun {cached['wall']:.1f} s / {cached['cpu']:.1f} s, "
                  f"plain {pl['wall']:.1f} s / {pl['cpu']:.1f} s", flush=True)
    keys = ["load", "wall", "cpu", "cli start", "server start", *STAGES, "between tasks", "exit",
            "train: task start -> first trainer line", "train: trainer's own clock"]
    cols = {}
    for label, r in runs.items():
        f, c, p = best(r["fresh"]), best(r["cached"]), best(r["plain"])
        cols[f"{label} neo run"], cols[f"{label} cached"], cols[f"{label} plain"] = f, c, p
        p.setdefault("cli start", p["imports"])
        for row in (f, c):
            row["overhead % wall"] = 100 * (row["wall"] - p["wall"]) / p["wall"] if row is f else None
            row["overhead % cpu"] = 100 * (row["cpu"] - p["cpu"]) / p["cpu"] if row is f else None
    table(f"best of {args.rounds} (the round with the lowest wall; seconds; plain 'cli start' = its imports)",
          cols, [*keys, "overhead % wall", "overhead % cpu"])
    print(f"\nload at end {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
