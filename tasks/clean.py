"""Clean: repair broken Unicode without touching source code, normalize, reject unusable documents.

Each raw shard becomes `docs-NNNNN.parquet` (id, text, source) plus a ledger
`rejected/rejected-NNNNN.parquet` (id, source, reason, n_chars) with one row per rejected document.
ftfy runs only on lines it judges broken (mojibake such as "cafÃ©"), and with the fixes that would
rewrite intact source code (quote uncurling, width folding, ligatures, HTML entities, escapes,
line breaks) switched off, so a Python file comes out with the same AST.
"""
from __future__ import annotations

import contextlib
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Sequence

import ftfy
import pyarrow as pa
import pyarrow.parquet as pq
from ftfy.badness import is_bad
from prefect import get_run_logger

from tasks.config import CleanConfig
from tasks.download import read_shard
from tasks.prefect_stage import report, stage_task
from tasks.stage import (StageResult, atomic_path, check_accounting, code_version, file_entry,
                         fingerprint, prepare_dir, read_manifest, result_from_manifest, stage_dir,
                         write_manifest)

STAGE = "clean"
VERSION = 1

REASONS = ("empty", "too_short", "too_long")
DOC_COLUMNS = ("id", "text", "source")
DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                           ("n_chars", pa.int64())])
FLUSH_ROWS = 2048
FLUSH_CHARS = 32_000_000
"""A Parquet row group is written when either bound is reached: bounded memory for any corpus."""
READ_BATCH_ROWS = 256


# ---------------------------------------------------------------------------- Parquet helpers


class ParquetSink:
    """Rows into one zstd Parquet file in bounded batches, under a temporary name until closed."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows = Path(path), schema, 0
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._chars = 0

    def __enter__(self) -> ParquetSink:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, self.schema, compression="zstd"))
        return self

    def add(self, **row: Any) -> None:
        for name, values in self._columns.items():
            value = row[name]
            values.append(value)
            if isinstance(value, str):
                self._chars += len(value)
        self.rows += 1
        if len(self._columns[self.schema.names[0]]) >= FLUSH_ROWS or self._chars >= FLUSH_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self._columns[self.schema.names[0]]:
            self._writer.write_table(pa.table(self._columns, schema=self.schema))
            self._columns = {name: [] for name in self.schema.names}
            self._chars = 0

    def __exit__(self, *exc: Any) -> bool | None:
        if exc[0] is None:
            self._flush()
        return self._stack.__exit__(*exc)


def iter_parquet_rows(path: Path, columns: Sequence[str] = DOC_COLUMNS) -> Iterator[dict[str, Any]]:
    """Rows of one Parquet file as dicts, read in small batches."""
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(columns)):
            yield from batch.to_pylist()


def iter_parquet_docs(directory: Path, columns: Sequence[str] = DOC_COLUMNS) -> Iterator[dict[str, Any]]:
    """Documents of a clean or dedup stage directory: `docs-*.parquet` in shard order, row order."""
    for path in sorted(Path(directory).glob("docs-*.parquet")):
        yield from iter_parquet_rows(path, columns)


def upstream_files(upstream: StageResult, prefix: str) -> list[Path]:
    """Files of a complete upstream stage whose manifest path starts with `prefix`, in order."""
    directory = Path(upstream.path)
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("fingerprint") != upstream.fingerprint:
        raise RuntimeError(f"{upstream.stage} output {directory} is incomplete or not the one "
                           f"fingerprinted {upstream.fingerprint}; rerun the {upstream.stage} stage")
    return sorted(directory / f["path"] for f in manifest["files"] if f["path"].startswith(prefix))


# ---------------------------------------------------------------------------- cleaning


def fixer_config(cfg: CleanConfig) -> ftfy.TextFixerConfig:
    """ftfy's mojibake repair, minus every fix that would rewrite intact source code."""
    return ftfy.TextFixerConfig(
        unescape_html=False,  # `&amp;` in code or docs is meant literally
        remove_terminal_escapes=False, uncurl_quotes=False, fix_latin_ligatures=False,
        fix_character_width=False, fix_line_breaks=False,
        normalization=None if cfg.normalization == "none" else cfg.normalization,
        explain=False)


def _needs_fix(line: str) -> bool:
    # Mojibake always involves non-ASCII characters; str.isascii is C-fast while ftfy's badness
    # regex reads ~1 MB/s, so only non-ASCII lines pay for it.
    return not line.isascii() and is_bad(line)


def repair(text: str, fixer: ftfy.TextFixerConfig) -> str:
    """Fix the lines ftfy judges broken; leave every other line byte for byte; then normalize."""
    if not text.isascii():
        text = "".join(ftfy.fix_text(line, fixer) if _needs_fix(line) else line
                       for line in text.splitlines(keepends=True))
    form = fixer.normalization
    if form and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    return text


def rejection(text: str, cfg: CleanConfig) -> str | None:
    """Why a (repaired) document is rejected, or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return None


def _plan(cfg: CleanConfig, upstream: StageResult, workspace: str) -> tuple[str, Path, str]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, cfg, [upstream.fingerprint], code)
    return fp, stage_dir(workspace, STAGE, fp), code


def plan(cfg: CleanConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return _plan(cfg, upstream, workspace)[:2]


def run_clean(cfg: CleanConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Clean every raw shard of `upstream` into Parquet documents plus a rejection ledger."""
    started = time.time()
    fp, directory, code = _plan(cfg, upstream, workspace)
    if (manifest := read_manifest(directory)) is not None:
        return result_from_manifest(directory, manifest, reused=True, info_keys=("repaired",))
    shards = upstream_files(upstream, "shard-")
    prepare_dir(directory)

    fixer = fixer_config(cfg)
    counts = {"docs_in": 0, "kept": 0, **{f"rejected:{r}": 0 for r in REASONS}}
    repaired, entries = 0, []
    for i, shard in enumerate(shards):
        with ParquetSink(directory / f"docs-{i:05d}.parquet", DOC_SCHEMA) as docs, \
                ParquetSink(directory / "rejected" / f"rejected-{i:05d}.parquet", REJECT_SCHEMA) as rejected:
            for doc in read_shard(shard):
                counts["docs_in"] += 1
                text = repair(doc["text"], fixer)
                repaired += text != doc["text"]
                reason = rejection(text, cfg)
                if reason is None:
                    docs.add(id=doc["id"], text=text, source=doc["source"])
                    counts["kept"] += 1
                else:
                    rejected.add(id=doc["id"], source=doc["source"], reason=reason, n_chars=len(text))
                    counts[f"rejected:{reason}"] += 1
        entries += [file_entry(docs.path, directory, rows=docs.rows),
                    file_entry(rejected.path, directory, rows=rejected.rows)]

    check_accounting(counts, counts["docs_in"], ["kept", *(f"rejected:{r}" for r in REASONS)],
                     f"clean {directory}")
    manifest = write_manifest(directory, stage=STAGE, fp=fp, code=code, config=cfg,
                              inputs=[upstream.fingerprint], counts=counts, files=entries,
                              started=started, repaired=repaired)
    return result_from_manifest(directory, manifest, reused=False, info_keys=("repaired",))


@stage_task(STAGE, plan)
def clean(cfg: CleanConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Repair Unicode and reject empty, too short and too long documents, with a ledger."""
    result = run_clean(cfg, upstream, workspace)
    c = result.counts
    rejected = {r: c.get(f"rejected:{r}", 0) for r in REASONS}
    get_run_logger().info(f"clean: {c['docs_in']} docs in, {c['kept']} kept, rejected {rejected}, "
                          f"{result.info.get('repaired', 0)} repaired -> {result.path}")
    kept_rate = c["kept"] / c["docs_in"] if c["docs_in"] else 0.0
    report(STAGE, result, [f"- kept: {kept_rate:.1%} of documents",
                           f"- repaired by ftfy or normalization: {result.info.get('repaired', 0)}",
                           f"- rejection ledger: `{Path(result.path) / 'rejected'}`"])
    return result
