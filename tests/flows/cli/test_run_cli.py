"""`neo run` refuses bad input before any work, as a user meets it: a mistyped or empty source and a
workspace another run holds each give one `error:` line, exit 2, and no Prefect server or store."""
import os
import subprocess
import sys
from pathlib import Path

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
    ws = str(tmp_path / "ws")
    result = CliRunner().invoke(app, ["data", "-c", "debug", "-w", ws])
    assert result.exit_code == 0, result.output
    tokens = next(ln.split(":", 1)[1].split(" (")[0].strip() for ln in result.output.splitlines()
                  if ln.startswith("tokens "))
    assert Path(tokens).parent == Path(ws) / "tokenize" and (Path(tokens) / "manifest.json").is_file()
    assert f"next             : neo train {tokens} -c debug -w {ws}" in result.output
    missing = CliRunner().invoke(app, ["train", str(tmp_path / "nope"), "-c", "debug", "-w", ws])
    assert missing.exit_code == 2 and "not a complete tokenize output directory" in missing.output
    result = CliRunner().invoke(app, ["train", tokens, "-c", "debug", "-w", ws])
    assert result.exit_code == 0, result.output
    assert "registered model : gpt-neo-debug version 1 (@champion)" in result.output
    assert f"stage train      : {Path(ws) / 'train'}" in result.output
