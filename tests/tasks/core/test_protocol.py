"""Stage infrastructure: code versions follow helpers, manifests mark completion."""
import json
from pathlib import Path

import pytest

from tasks.core.protocol import (code_version, fingerprint, read_manifest, verify_manifest, file_entry,
                         write_manifest, check_accounting)


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
