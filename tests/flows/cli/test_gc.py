"""Retention: only stage outputs that no registered version and no recent run needs are removed."""
import os
import time

from typer.testing import CliRunner

from flows.cli.main import app
from flows.cli import gc
from tasks.core import tracking


def _stage(ws, dirname, fp, days_old, now):
    d = ws / dirname / fp
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    (d / "data.bin").write_bytes(b"x" * 1000)
    for p in (d / "manifest.json", d / "data.bin", d):
        os.utime(p, (now - days_old * 86400, now - days_old * 86400))
    return d


def test_gc_keeps_referenced_and_recent_outputs(tmp_path):
    ws, now = tmp_path / "ws", time.time()
    used, unused, run_fp, recent_fp = ("a" * 16, "b" * 16, "c" * 16, "d" * 16)
    old_used = _stage(ws, "tokenize", used, 30, now)
    old_unused = _stage(ws, "tokenize", unused, 30, now)
    old_run = _stage(ws, "train", run_fp, 30, now)
    recent = _stage(ws, "clean", recent_fp, 1, now)
    units = [_stage(ws, "clean", "shards", 30, now), _stage(ws, "dedup", "scratch", 30, now)]
    c = tracking.client(ws)
    exp = tracking.experiment_id(c, "x", ws)
    run = c.create_run(exp)
    c.create_registered_model("m")
    c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id,
                           tags={"neo.fp.tokenize": used})
    refs = gc.referenced_fingerprints(c)
    assert used in refs
    found = gc.collect(ws, refs, keep_days=7, now=now)
    assert {f.path for f in found} == {old_unused, old_run}
    assert all(f.bytes == 1002 for f in found)

    runner = CliRunner()
    dry = runner.invoke(app, ["gc", "-w", str(ws)])
    assert dry.exit_code == 0 and "dry run: 2 directories" in dry.output, dry.output
    assert old_unused.exists() and old_run.exists()
    real = runner.invoke(app, ["gc", "-w", str(ws), "--yes"])
    assert real.exit_code == 0 and "removed 2 directories" in real.output, real.output
    assert not old_unused.exists() and not old_run.exists()
    assert old_used.exists() and recent.exists() and all(u.exists() for u in units)
