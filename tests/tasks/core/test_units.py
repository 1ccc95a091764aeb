"""Per-shard units in worker processes: a script without a `__main__` guard (its workers import it
again and die) gets an error that says what to do, not a bare BrokenProcessPool."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_unguarded_script_is_told_to_add_a_main_guard(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("from tasks.core.units import pool_map\nprint(pool_map(len, [('ab',), ('abc',)], 2))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert 'put its top level under `if __name__ == "__main__":`' in out.stderr
    assert str(script) in out.stderr
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from tasks.core.units import pool_map\nif __name__ == '__main__':\n"
                       "    print(pool_map(len, [('ab',), ('abc',)], 2))\n")
    out = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[2, 3]", out.stderr
