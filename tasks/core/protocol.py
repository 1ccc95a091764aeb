"""The stage protocol: a `Stage` descriptor, `run_stage`, fingerprints, code versions and manifests.

A stage writes into `<workspace>/<stage name>/<fingerprint>/`. The fingerprint hashes the stage's
config section, its inputs' fingerprints and its code version. `run_stage` is the one way a stage
runs: plan (fingerprint, directory) -> reuse a complete directory -> compute -> write the manifest
last -> a `StageResult`. Files are written under a temporary name and renamed; `manifest.json` is
written last and is the completion marker: a directory whose manifest exists and whose files have
the recorded sizes is complete and never rewritten; anything else there is a partial run and is
rebuilt (or, for a stage that resumes, kept unit by unit). Per-shard unit directories
(`tasks/core/units.py`) and a stage's resumable units use the same marker: a JSON file listing the
files it vouches for with their sizes, written last (`write_marker`, `read_marker`). A workspace on shared storage (an fsspec URL) is mirrored by
`tasks/core/storage.py` through `read_manifest` and `write_manifest`. Nothing here imports Prefect
(see `tasks/core/prefect_stage.py`).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import BaseModel, Field

from tasks.core import storage

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("tasks", "neo_model", "flows")
MANIFEST = "manifest.json"


class StageResult(BaseModel):
    """What a stage task returns: where its output is and what it counted. Never data."""

    stage: str
    fingerprint: str
    path: str
    counts: dict[str, int] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    reused: bool = False
    """True when a complete stage directory was found and nothing was recomputed."""
    lineage: dict[str, str] = Field(default_factory=dict)
    """Every upstream stage's fingerprint, transitively (stage name -> fingerprint): the whole chain
    this output was built from, as its manifest records it."""


# ---------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of canonical JSON (pydantic models dumped in JSON mode)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            for alias in node.names:  # `from pkg import submodule`
                yield f"{base}.{alias.name}"


_PARSED: dict[tuple[str, str], tuple[int, int, str, tuple[str, ...]]] = {}


def _parse_module(path: Path, name: str) -> tuple[str, tuple[str, ...]]:
    """(normalized source, imported module names), cached until the file's mtime or size changes."""
    st = path.stat()
    hit = _PARSED.get((str(path), name))
    if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2], hit[3]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imports = tuple(_imported_modules(tree, name, path.name == "__init__.py"))
    dumped = ast.dump(_strip_docstrings(tree), include_attributes=False)
    _PARSED[(str(path), name)] = (st.st_mtime_ns, st.st_size, dumped, imports)
    return dumped, imports


def source_closure(module: str, root: Path | None = None,
                   packages: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, str]:
    """Module name -> normalized source (AST without comments/docstrings) for `module` and every
    project module it imports, transitively. Parent packages' `__init__` count too, since importing
    a submodule runs them."""
    root = Path(root or PROJECT_ROOT)  # read at call time: the sources on disk now
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in packages:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        seen[name], imports = _parse_module(path, name)
        todo.extend(imports)
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)
    return seen


def code_version(module: str, version: int | str, root: Path | None = None,
                 packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """`v<version>-<hash>`: the stage's version constant plus a hash of its sources and helpers.

    Prefect's TASK_SOURCE sees only the task function; hashing the import closure means that
    editing any helper a stage calls re-runs that stage (and, through fingerprints, the ones after it).
    """
    closure = source_closure(module, root, packages)
    if module not in closure:
        raise ValueError(f"module {module!r} not found under {root or PROJECT_ROOT}")
    return f"v{version}-{stable_hash(closure, 12)}"


def fingerprint(stage: str, config: BaseModel | dict | None, inputs: list[str], code: str) -> str:
    """Content address of a stage output: its config, its inputs' fingerprints, its code version."""
    return stable_hash({"stage": stage, "config": config.model_dump(mode="json")
                        if isinstance(config, BaseModel) else config,
                        "inputs": inputs, "code": code})


# ---------------------------------------------------------------------------- stage directories


def stage_dir(workspace: str | Path, stage: str, fp: str) -> Path:
    return Path(workspace) / stage / fp


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_entry(path: Path, base: Path, rows: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(path.relative_to(base)), "bytes": path.stat().st_size,
                             "sha256": sha256_file(path)}
    if rows is not None:
        entry["rows"] = rows
    return entry


def read_manifest(directory: Path) -> dict | None:
    """The manifest if the directory is complete (manifest present, files at recorded sizes).

    In a workspace on shared storage (`tasks/core/storage.py`), an incomplete local directory is first
    fetched from a complete remote copy, if there is one."""
    manifest = _local_manifest(directory)
    if manifest is None and storage.fetch(directory):
        manifest = _local_manifest(directory)
    return manifest


def _local_manifest(directory: Path) -> dict | None:
    return read_marker(Path(directory) / MANIFEST, Path(directory))


def write_marker(path: Path, files: list[dict[str, Any]], **fields: Any) -> dict:
    """A completion marker: `fields` plus `files` (path relative to the marked directory, bytes),
    written last and atomically, after every file it lists."""
    marker = {**fields, "files": files}
    write_json_atomic(Path(path), marker)
    return marker


def read_marker(path: Path, base: Path) -> dict | None:
    """The marker at `path` if every file it lists is under `base` at its recorded size, else None
    (missing, unreadable, or a file changed since: the work it vouched for is not trusted)."""
    try:
        marker = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for f in marker.get("files", []):
        p = Path(base) / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"]:
            return None
    return marker


def verify_manifest(directory: Path) -> list[str]:
    """Full sha256 re-check (`neo verify`): a list of problems, empty when all is well."""
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{directory}: incomplete (missing manifest or file sizes differ)"]
    return [f"{directory / f['path']}: sha256 mismatch" for f in manifest["files"]
            if sha256_file(Path(directory) / f["path"]) != f["sha256"]]


def prepare_dir(directory: Path) -> None:
    """Start a stage directory afresh: a directory without a valid manifest is a partial run."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def write_manifest(directory: Path, *, stage: str, fp: str, code: str, config: Any,
                   inputs: list[str], counts: dict[str, int], files: list[dict[str, Any]],
                   started: float, **extra: Any) -> dict:
    """Write `manifest.json` last: from now on the directory is complete (and, in a workspace on
    shared storage, uploaded: data files first, the manifest last)."""
    manifest = write_marker(
        Path(directory) / MANIFEST, files, stage=stage, fingerprint=fp, code_version=code,
        config=config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
        inputs=inputs, counts=counts, seconds=round(time.time() - started, 3), **extra)
    storage.publish(directory)
    return manifest


def result_from_manifest(directory: Path, manifest: dict, reused: bool,
                         info_keys: tuple[str, ...] = ()) -> StageResult:
    if reused:  # shared storage: a retry after a failed upload finds the directory complete here
        storage.publish(directory)
    return StageResult(stage=manifest["stage"], fingerprint=manifest["fingerprint"],
                       path=str(directory), counts=manifest["counts"],
                       info={k: manifest[k] for k in info_keys if k in manifest}, reused=reused,
                       lineage=manifest.get("lineage", {}))


def lineage_of(upstream: Sequence[StageResult]) -> dict[str, str]:
    """The chain behind outputs built from `upstream`: each one and everything it was built from."""
    chain: dict[str, str] = {}
    for u in upstream:
        chain.update(u.lineage)
        chain[u.stage] = u.fingerprint
    return chain


def check_accounting(counts: dict[str, int], docs_in: int, out_keys: list[str], where: str) -> None:
    """Documents in must equal the sum of every outcome: nothing disappears without a ledger row."""
    total = sum(counts.get(k, 0) for k in out_keys)
    if total != docs_in:
        raise RuntimeError(f"{where}: accounting broken: {docs_in} documents in, "
                           f"{total} accounted for ({ {k: counts.get(k, 0) for k in out_keys} })")


# ---------------------------------------------------------------------------- the stage protocol


@dataclass(frozen=True)
class Stage:
    """What identifies a stage. Its name is also its output folder (`<workspace>/<name>/<fp>/`) and
    its Prefect task's name; `module` and `version` make its code version; `section` is the
    PipelineConfig section it reads; `inputs` are the stages whose outputs it reads."""

    name: str
    version: int
    module: str
    section: str
    inputs: tuple[str, ...] = ()
    info_keys: tuple[str, ...] = ()
    """Manifest fields copied into the StageResult's `info`."""

    def code(self) -> str:
        return code_version(self.module, self.version)

    def plan(self, key: Any, inputs: list[str], workspace: str | Path) -> tuple[str, Path]:
        """(fingerprint, directory) of the output for config `key` over input fingerprints `inputs`."""
        fp = fingerprint(self.name, key, inputs, self.code())
        return fp, stage_dir(workspace, self.name, fp)

    def done(self, directory: Path) -> StageResult | None:
        """The result recorded in a complete output directory; None when it is not complete."""
        manifest = read_manifest(directory)
        return None if manifest is None else result_from_manifest(directory, manifest, True, self.info_keys)


@dataclass
class Computed:
    """What a stage's compute step returns: its counts, the files it wrote (`file_entry`s), and
    extra manifest fields (those named in `Stage.info_keys` reach the StageResult)."""

    counts: dict[str, int]
    files: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def run_stage(stage: Stage, planned: tuple[str, Path], compute: Callable[[Path], Computed], *,
              config: Any, inputs: list[str], upstream: Sequence[StageResult] = (),
              resume: bool = False) -> StageResult:
    """Plan -> reuse -> compute -> manifest last. A complete directory is returned as it is
    (`reused`); otherwise the directory starts afresh (or, with `resume`, keeps what is there for
    a compute step that checks its own units) and `compute(directory)` fills it. The manifest
    records `inputs` (what the fingerprint hashed) and the lineage of the `upstream` results."""
    fp, directory = planned
    if (done := stage.done(directory)) is not None:
        return done
    started = time.time()
    if resume:
        directory.mkdir(parents=True, exist_ok=True)
    else:
        prepare_dir(directory)
    out = compute(directory)
    manifest = write_manifest(directory, stage=stage.name, fp=fp, code=stage.code(), config=config,
                              inputs=inputs, counts=out.counts, files=out.files, started=started,
                              lineage=lineage_of(upstream), **out.info)
    return result_from_manifest(directory, manifest, reused=False, info_keys=stage.info_keys)
