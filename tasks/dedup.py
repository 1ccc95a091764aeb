"""Dedup: drop exact duplicates (sha256 of normalized text), keeping the first occurrence.

Order is deterministic (shard order, then row order), so the same document is kept on every run.
Each clean shard becomes `docs-NNNNN.parquet` of kept documents plus a ledger
`duplicates/duplicates-NNNNN.parquet` (id, source, duplicate_of, cluster) with one row per dropped
document. Memory holds hashes only: a first pass finds which hashes repeat, a second pass writes,
remembering a kept id only for hashes that do repeat.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger

from tasks.clean import DOC_SCHEMA, ParquetSink, iter_parquet_rows, upstream_files
from tasks.config import DedupConfig
from tasks.prefect_stage import report, stage_task
from tasks.stage import (StageResult, check_accounting, code_version, file_entry, fingerprint,
                         prepare_dir, read_manifest, result_from_manifest, stage_dir, write_manifest)

STAGE = "dedup"
VERSION = 1

DUPLICATE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()),
                              ("duplicate_of", pa.string()), ("cluster", pa.string())])


def text_key(text: str, cfg: DedupConfig) -> bytes:
    """sha256 of the text as compared: whitespace runs collapsed and ends stripped, optionally
    lowercased."""
    if cfg.normalize_whitespace:
        text = " ".join(text.split())
    if cfg.lowercase:
        text = text.lower()
    return hashlib.sha256(text.encode("utf-8")).digest()


def repeated_keys(shards: list[Path], cfg: DedupConfig) -> tuple[set[bytes], set[bytes]]:
    """(every distinct key, the keys seen more than once)."""
    seen: set[bytes] = set()
    repeated: set[bytes] = set()
    for shard in shards:
        for row in iter_parquet_rows(shard, ("text",)):
            key = text_key(row["text"], cfg)
            (repeated if key in seen else seen).add(key)
    return seen, repeated


def _plan(cfg: DedupConfig, upstream: StageResult, workspace: str) -> tuple[str, Path, str]:
    code = code_version(__name__, VERSION)
    fp = fingerprint(STAGE, cfg, [upstream.fingerprint], code)
    return fp, stage_dir(workspace, STAGE, fp), code


def plan(cfg: DedupConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return _plan(cfg, upstream, workspace)[:2]


def run_dedup(cfg: DedupConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Write the first occurrence of every distinct text and a ledger of the duplicates."""
    started = time.time()
    fp, directory, code = _plan(cfg, upstream, workspace)
    if (manifest := read_manifest(directory)) is not None:
        return result_from_manifest(directory, manifest, reused=True, info_keys=("clusters",))
    shards = upstream_files(upstream, "docs-")
    prepare_dir(directory)

    unseen, repeated = repeated_keys(shards, cfg)
    kept_id: dict[bytes, str] = {}  # only for keys that repeat: the id their duplicates point to
    counts = {"docs_in": 0, "kept": 0, "duplicates": 0}
    entries = []
    for i, shard in enumerate(shards):
        with ParquetSink(directory / f"docs-{i:05d}.parquet", DOC_SCHEMA) as docs, \
                ParquetSink(directory / "duplicates" / f"duplicates-{i:05d}.parquet",
                            DUPLICATE_SCHEMA) as dups:
            for row in iter_parquet_rows(shard):
                counts["docs_in"] += 1
                key = text_key(row["text"], cfg)
                if key in unseen:  # first occurrence
                    unseen.discard(key)
                    if key in repeated:
                        kept_id[key] = row["id"]
                    docs.add(**row)
                    counts["kept"] += 1
                else:
                    dups.add(id=row["id"], source=row["source"], duplicate_of=kept_id[key],
                             cluster=key.hex())
                    counts["duplicates"] += 1
        entries += [file_entry(docs.path, directory, rows=docs.rows),
                    file_entry(dups.path, directory, rows=dups.rows)]

    check_accounting(counts, counts["docs_in"], ["kept", "duplicates"], f"dedup {directory}")
    manifest = write_manifest(directory, stage=STAGE, fp=fp, code=code, config=cfg,
                              inputs=[upstream.fingerprint], counts=counts, files=entries,
                              started=started, clusters=len(repeated))
    return result_from_manifest(directory, manifest, reused=False, info_keys=("clusters",))


@stage_task(STAGE, plan)
def dedup(cfg: DedupConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Drop exact duplicate documents, keeping the first, with a duplicates ledger."""
    result = run_dedup(cfg, upstream, workspace)
    c = result.counts
    get_run_logger().info(f"dedup: {c['docs_in']} docs in, {c['kept']} kept, {c['duplicates']} "
                          f"duplicates in {result.info.get('clusters', 0)} clusters -> {result.path}")
    rate = c["duplicates"] / c["docs_in"] if c["docs_in"] else 0.0
    report(STAGE, result, [f"- duplicate rate: {rate:.1%}",
                           f"- clusters with duplicates: {result.info.get('clusters', 0)}",
                           f"- duplicates ledger: `{Path(result.path) / 'duplicates'}`"])
    return result
