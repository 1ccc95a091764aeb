"""Workspace retention: find stage outputs that no registered model version and no recent run needs.

A stage directory `<workspace>/<stage>/<fingerprint>/` (a folder named by a fingerprint: unit and
scratch folders beside them, such as `clean/shards/`, are not stage outputs) is kept when
- a registered model version's lineage names it (version tags `neo.fp.<stage>`, set by register), or
- the directory changed within the last `keep_days` days (a recent or running pipeline may use it).
Everything else is listed (dry run) and, when asked, removed. Checkpoints of kept training runs stay;
the download cache is removed only with `include_cache`.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("download", "clean", "dedup", "tokenize", "train", "evaluate", "register")
"""Each stage's output folder is its name (tasks/core/protocol.py `Stage`)."""
FINGERPRINT = re.compile(r"[0-9a-f]{16}")


@dataclass
class Candidate:
    path: Path
    stage: str
    fingerprint: str
    bytes: int
    age_days: float


def referenced_fingerprints(client) -> set[str]:
    """Every stage fingerprint that any version of any registered model was built from."""
    refs: set[str] = set()
    for rm in client.search_registered_models():
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            refs |= {v for k, v in mv.tags.items() if k.startswith("neo.fp.") or k == "neo_fingerprint"}
    return refs


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _age_days(path: Path, now: float) -> float:
    newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
    return (now - newest) / 86400


def collect(workspace: str | Path, referenced: set[str], keep_days: float = 7.0,
            include_cache: bool = False, now: float | None = None) -> list[Candidate]:
    """Stage directories that may be removed, oldest first."""
    ws, now = Path(workspace), now if now is not None else time.time()
    found = []
    for stage in STAGES:
        root = ws / stage
        if not root.is_dir():
            continue
        for d in root.iterdir():
            if not d.is_dir() or not FINGERPRINT.fullmatch(d.name) or d.name in referenced:
                continue
            age = _age_days(d, now)
            if age >= keep_days:
                found.append(Candidate(d, stage, d.name, _size(d), age))
    cache = ws / "download-cache"
    if include_cache and cache.is_dir():
        found.append(Candidate(cache, "download-cache", "-", _size(cache), _age_days(cache, now)))
    return sorted(found, key=lambda c: -c.age_days)


def remove(candidates: list[Candidate]) -> int:
    """Delete the candidates; returns bytes freed."""
    freed = 0
    for c in candidates:
        freed += c.bytes
        shutil.rmtree(c.path)
    return freed
