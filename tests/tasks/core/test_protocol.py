"""The stage protocol: code versions follow helpers, manifests and markers mark completion, run_stage
plans, reuses, computes and writes the manifest last, and manifests carry the whole lineage."""
import json
import os
from pathlib import Path

import pytest

from tasks.core.protocol import (Computed, Stage, check_accounting, code_version, file_entry, fingerprint,
                                 lineage_of, read_manifest, read_marker, run_stage, verify_manifest,
                                 write_manifest, write_marker)


def _write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.fixture
def pkg(tmp_path):
    _write(tmp_path, "proj/__init__.py", "")
    _write(tmp_path, "proj/stage_a.py", "from proj.helpers import norm\nVERSION = 1\n\ndef run(x):\n    return norm(x)\n")
    _write(tmp_path, "proj/helpers.py", "from .deep import base\n\ndef norm(x):\n    return base(x).strip()\n")
    _write(tmp_path, "proj/deep.py", '"""doc"""\n\ndef base(x):\n    return x\n')
    _write(tmp_path, "proj/unrelated.py", "def other():\n    return 1\n")
    return tmp_path


def _cv(root, version=1):
    return code_version("proj.stage_a", version, root=root, packages=("proj",))


def test_code_version_follows_helpers_transitively(pkg):
    before = _cv(pkg)
    assert before.startswith("v1-")
    _write(pkg, "proj/unrelated.py", "def other():\n    return 2\n")
    assert _cv(pkg) == before, "a module the stage does not import must not change its version"
    _write(pkg, "proj/deep.py", '"""doc"""\n\ndef base(x):\n    return x * 2\n')
    assert _cv(pkg) != before, "editing a helper's helper must change the stage's version"


def test_code_version_ignores_comments_and_docstrings_but_not_version(pkg):
    before = _cv(pkg)
    _write(pkg, "proj/deep.py", '"""another doc"""\n# a comment\n\ndef base(x):\n    """hi"""\n    return x\n')
    assert _cv(pkg) == before
    assert _cv(pkg, version=2) != before


def test_fingerprint_depends_on_config_inputs_and_code():
    base = fingerprint("s", {"a": 1}, ["in1"], "v1-x")
    assert base == fingerprint("s", {"a": 1}, ["in1"], "v1-x")
    assert len({base, fingerprint("s", {"a": 2}, ["in1"], "v1-x"),
                fingerprint("s", {"a": 1}, ["in2"], "v1-x"),
                fingerprint("s", {"a": 1}, ["in1"], "v1-y")}) == 4


def test_manifest_is_the_completion_marker(tmp_path):
    d = tmp_path / "stage" / "fp"
    d.mkdir(parents=True)
    (d / "data.bin").write_bytes(b"hello")
    assert read_manifest(d) is None
    write_manifest(d, stage="s", fp="fp", code="v1", config={}, inputs=[], counts={"n": 1},
                   files=[file_entry(d / "data.bin", d, rows=1)], started=0.0)
    m = read_manifest(d)
    assert m["counts"] == {"n": 1} and m["files"][0]["rows"] == 1
    assert verify_manifest(d) == []
    (d / "data.bin").write_bytes(b"HELLO")  # same size, different bytes: only the full check sees it
    assert read_manifest(d) is not None
    assert verify_manifest(d) == [f"{d / 'data.bin'}: sha256 mismatch"]
    (d / "data.bin").write_bytes(b"hello!")  # size differs: the directory is no longer complete
    assert read_manifest(d) is None
    assert json.loads((d / "manifest.json").read_text())["fingerprint"] == "fp"


def test_accounting_mismatch_is_an_error():
    check_accounting({"kept": 3, "rejected:short": 2}, 5, ["kept", "rejected:short"], "clean")
    with pytest.raises(RuntimeError, match="5 documents in, 4 accounted"):
        check_accounting({"kept": 3, "rejected:short": 1}, 5, ["kept", "rejected:short"], "clean")


# ---------------------------------------------------------------------------- run_stage


def _stage(name: str, *inputs: str) -> Stage:
    return Stage(name, version=1, module="tasks.core.units", section="clean", inputs=inputs,
                 info_keys=("note",))


def _writer(calls: list, fail: bool = False):
    def compute(out: Path) -> Computed:
        calls.append(out)
        (out / "data.txt").write_text("payload")
        if fail:
            raise RuntimeError("compute failed")
        return Computed({"rows": 1}, [file_entry(out / "data.txt", out, rows=1)], {"note": "hi", "other": 2})
    return compute


def test_run_stage_computes_once_writes_manifest_last_and_reuses(tmp_path):
    stage, calls = _stage("alpha"), []
    planned = stage.plan({"k": 1}, ["in"], tmp_path)
    assert planned[1] == tmp_path / "alpha" / planned[0]  # the output folder is the stage's name
    with pytest.raises(RuntimeError, match="compute failed"):
        run_stage(stage, planned, _writer(calls, fail=True), config={"k": 1}, inputs=["in"])
    assert read_manifest(planned[1]) is None and (planned[1] / "data.txt").exists()  # partial: untrusted
    first = run_stage(stage, planned, _writer(calls), config={"k": 1}, inputs=["in"])
    assert not first.reused and first.counts == {"rows": 1} and first.info == {"note": "hi"}
    manifest = read_manifest(planned[1])
    assert manifest["inputs"] == ["in"] and manifest["other"] == 2 and manifest["stage"] == "alpha"
    again = run_stage(stage, planned, _writer(calls), config={"k": 1}, inputs=["in"])
    assert again.reused and again.fingerprint == first.fingerprint and len(calls) == 2
    (planned[1] / "data.txt").write_text("changed size")  # a damaged output is rebuilt
    rebuilt = run_stage(stage, planned, _writer(calls), config={"k": 1}, inputs=["in"])
    assert not rebuilt.reused and len(calls) == 3 and (planned[1] / "data.txt").read_text() == "payload"


def test_run_stage_resume_keeps_what_a_partial_run_left(tmp_path):
    stage, seen = _stage("beta"), []
    planned = stage.plan({}, [], tmp_path)
    planned[1].mkdir(parents=True)
    (planned[1] / "unit-0.txt").write_text("done before the crash")

    def compute(out: Path) -> Computed:
        seen.append(sorted(p.name for p in out.iterdir()))
        return Computed({}, [])

    run_stage(stage, planned, compute, config={}, inputs=[], resume=True)
    assert seen == [["unit-0.txt"]]
    fresh = _stage("gamma")
    planned = fresh.plan({}, [], tmp_path)
    planned[1].mkdir(parents=True)
    (planned[1] / "stale.txt").write_text("x")
    run_stage(fresh, planned, compute, config={}, inputs=[])
    assert seen[-1] == []  # without resume a partial directory starts afresh


def test_lineage_is_the_whole_chain_in_every_manifest(tmp_path):
    a, b, c = _stage("a"), _stage("b", "a"), _stage("c", "b")
    ra = run_stage(a, a.plan({}, [], tmp_path), _writer([]), config={}, inputs=[])
    rb = run_stage(b, b.plan({}, [ra.fingerprint], tmp_path), _writer([]), config={}, inputs=[ra.fingerprint],
                   upstream=[ra])
    rc = run_stage(c, c.plan({}, [rb.fingerprint], tmp_path), _writer([]), config={}, inputs=[rb.fingerprint],
                   upstream=[rb])
    assert ra.lineage == {} and rb.lineage == {"a": ra.fingerprint}
    assert rc.lineage == {"a": ra.fingerprint, "b": rb.fingerprint}
    assert _stage("c").done(Path(rc.path)).lineage == rc.lineage  # read back from the manifest
    assert lineage_of([rc]) == {"a": ra.fingerprint, "b": rb.fingerprint, "c": rc.fingerprint}


def test_markers_vouch_for_their_files_sizes(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"1234")
    write_marker(tmp_path / "m.json", [{"path": "f.bin", "bytes": 4}], unit=3)
    assert read_marker(tmp_path / "m.json", tmp_path)["unit"] == 3
    (tmp_path / "f.bin").write_bytes(b"123")
    assert read_marker(tmp_path / "m.json", tmp_path) is None
    (tmp_path / "m.json").write_text("{trunc")
    assert read_marker(tmp_path / "m.json", tmp_path) is None
    assert read_marker(tmp_path / "missing.json", tmp_path) is None


def test_mlflow_fluent_api_is_pointed_at_a_workspace_only_inside_the_block(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: without putting it back, the first
    workspace would capture every later one in the same process."""
    import mlflow

    from tasks.core import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    with tracking.fluent(a):
        assert mlflow.get_tracking_uri() == tracking.tracking_uri(a) == mlflow.get_registry_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert tracking.tracking_uri(b) == f"sqlite:///{(b / 'mlflow' / 'mlflow.db').resolve()}"
