"""`neo run` refuses bad input before any work, as a user meets it: a mistyped or empty source and a
workspace another run holds each give one `error:` line, exit 2, and no Prefect server or store."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.lock import LOCK, workspace_lock
from flows.cli.lock import holder as holder_of
from flows.cli.main import app

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str):
    result = CliRunner().invoke(app, ["run", "-c", "debug", *args])
    return result.exit_code, result.output


def test_missing_or_empty_source_fails_before_anything_starts(tmp_path):
    ws, empty = tmp_path / "ws", tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\0\1")  # present, but not a readable kind
    code, out = _run("--set", "corpus.sources=['/nonexistent/neo-corpus']", "-w", str(ws))
    assert code == 2 and out.strip() == "error: corpus source '/nonexistent/neo-corpus' does not exist", out
    code, out = _run("--set", f"corpus.sources=['{empty}']", "-w", str(ws))
    assert code == 2 and out.startswith(f"error: corpus source '{empty}' matched no readable files"), out
    assert len(out.strip().splitlines()) == 1 and not ws.exists()  # no Prefect home, no MLflow store


def test_a_second_run_on_a_held_workspace_names_the_holder(tmp_path):
    ws = tmp_path / "ws"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from flows.cli.lock import "
         "workspace_lock\nwith workspace_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n"
         "    time.sleep(60)", str(ws)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out = _run("-w", str(ws))
        assert code == 2, out
        assert out.startswith(f"error: workspace {ws} is in use by pid {holder.pid} (neo ") and "--wait" in out
        assert not (ws / "prefect").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (ws / LOCK).exists()  # the lock file stays; the kernel released the lock with the process
    with workspace_lock(ws):  # so the next run gets it at once
        assert f"pid {os.getpid()}" in holder_of(ws)


def test_neo_data_then_neo_train_register_a_model(tmp_path):
    """The two halves of `neo run` as verbs: `neo data` prints the token directory, `neo train` takes it."""
    neo, ws = str(Path(sys.executable).parent / "neo"), str(tmp_path / "ws")

    def cli(*args):
        return subprocess.run([neo, *args], capture_output=True, text=True, timeout=600)

    data = cli("data", "-c", "debug", "-w", ws)
    assert data.returncode == 0, data.stdout[-3000:] + data.stderr[-3000:]
    tokens = next(ln.split(":", 1)[1].split(" (")[0].strip() for ln in data.stdout.splitlines()
                  if ln.startswith("tokens "))
    assert Path(tokens).parent == Path(ws) / "tokenize" and (Path(tokens) / "manifest.json").is_file()
    assert f"next             : neo train {tokens} -c debug -w {ws}" in data.stdout
    missing = cli("train", str(tmp_path / "nope"), "-c", "debug", "-w", ws)
    assert missing.returncode == 2 and "not a complete tokenize output directory" in missing.stderr
    train = cli("train", tokens, "-c", "debug", "-w", ws)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "registered model : gpt-neo-debug version 1 (@champion)" in train.stdout
    assert f"stage train      : {Path(ws) / 'train'}" in train.stdout

    # `neo eval` scores any model the way the evaluate stage did: a directory or a registered version
    import json

    model_dir = next((Path(ws) / "train").glob("*/model"))
    stage_bpb = json.loads(next((Path(ws) / "evaluate").glob("*/metrics.json")).read_text())["val_bpb"]
    for model in (str(model_dir), "gpt-neo-debug@champion"):
        ev = cli("eval", model, "--tokens", tokens, "-c", "debug", "-w", ws)
        assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
        scores = dict(line.split() for line in ev.stdout.splitlines())
        assert float(scores["val_bpb"]) == pytest.approx(stage_bpb, abs=1e-6) and "unigram_val_bpb" in scores
    nothing = cli("eval", str(model_dir), "-c", "debug")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: nothing to evaluate")


def test_a_stage_that_fails_ends_with_one_error_line_not_a_traceback(tmp_path):
    """Bad input that only a stage can judge (one short file: one split gets no rows): exit 1, the
    stage's message as the CLI's last words, and no CLI traceback."""
    neo, ws, corpus = str(Path(sys.executable).parent / "neo"), str(tmp_path / "ws"), tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x + 1\n" * 8)
    args = [neo, "data", "-c", "debug", "-w", ws, "--set", f"corpus.sources=['{corpus}']"]
    bad = subprocess.run(args, capture_output=True, text=True, timeout=600)
    tail = [line for line in bad.stderr.splitlines() if line.strip() and " | INFO " not in line][-2:]
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert tail[0].startswith("error: ValueError: tokenize: the ") and "split has no rows" in tail[0], tail
    assert tail[1] == "(traceback in the log above; a rerun reuses every stage that finished)"
    assert "Traceback (most recent call last)" not in bad.stderr.split("Flow run 'data-debug' - Finished")[-1]
    assert "╭" not in bad.stdout + bad.stderr  # no rich traceback box from the CLI


def test_sigterm_during_training_stops_everything_and_a_rerun_resumes(tmp_path):
    """SIGTERM to `neo run`'s process group mid-training: the runs are marked Crashed, the command
    exits 143 saying so, no process of it (training, embedded server) survives, and the same command
    again resumes from the newest checkpoint."""
    import signal
    import time

    ws = tmp_path / "ws"
    cmd = [str(Path(sys.executable).parent / "neo"), "run", "-c", "debug", "-w", str(ws),
           "--set", "train.max_steps=600", "--set", "train.checkpoint_every=5"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while "step 20/" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "Finished in state Crashed" in text and "neo: stopped by SIGTERM" in text
    time.sleep(1)
    left = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(proc.pid)], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes of the stopped run survive:\n{left}"  # also the embedded server
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the same command
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    assert "registered model : gpt-neo-debug" in again.stdout
    output = again.stdout + again.stderr  # what the user reads: no library chatter
    for noise in ("Successfully registered model", "Created version", "UserWarning", "Downloading artifacts",
                  "CREATE TABLE", "Traceback"):
        assert noise not in output, f"{noise!r} in `neo run` output:\n{output[-3000:]}"
