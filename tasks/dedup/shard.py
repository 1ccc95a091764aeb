"""The dedup stage's units (worker processes): sign one clean shard; write one shard minus its
duplicates plus its ledger.

Runs in spawned workers, so it imports no Prefect; the unit directory protocol (content-addressed
name, `manifest.json` written last) is `tasks/core/units.py`'s.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.data_config import DedupConfig
from tasks.core.protocol import atomic_path
from tasks.core.units import DOC_COLUMNS, FLUSH_ROWS, finish_unit, link, read_done, save_npy, start_unit
from tasks.dedup.minhash import band_keys, document_hashes, hash_params, oph_flat, signatures

DUPLICATE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()),
                              ("duplicate_of", pa.string()), ("kind", pa.string()),
                              ("similarity", pa.float64()), ("kept", pa.string()),
                              ("cluster", pa.string())])
"""One removed document: the earlier document it matched (`duplicate_of`; `kind` and `similarity`
of that match), the surviving document its matches lead back to (`kept`), its cluster."""


def signature_shard(cfg: DedupConfig, docs: str, out: str) -> dict:
    """Exact keys, MinHash signatures and LSH band keys of one clean shard, as .npy files."""
    directory = Path(out)
    if (done := read_done(directory)) is not None:
        return {**done, "reused": True}
    started = time.time()
    start_unit(directory)
    texts = pq.read_table(docs, columns=["text"], use_threads=False).column("text").to_pylist()
    hashed = document_hashes(texts, cfg.ngram, cfg.near, cfg.normalize_whitespace, cfg.lowercase)
    del texts
    exact, num_perm = hashed.exact, cfg.bands * cfg.rows
    if not cfg.near:
        sig = np.zeros((len(exact), num_perm), dtype=np.uint32)
    elif cfg.method == "oph":
        sig = oph_flat(hashed.shingles, hashed.offsets, num_perm, cfg.seed)
    else:
        shingles = np.split(hashed.shingles, hashed.offsets[1:-1])
        sig = signatures(shingles, *hash_params(num_perm, cfg.seed))
    near = np.diff(hashed.offsets) > 0
    save_npy(directory, "exact.npy", exact)
    save_npy(directory, "signatures.npy", sig)
    save_npy(directory, "bands.npy", band_keys(sig, cfg.bands, cfg.rows))
    save_npy(directory, "near.npy", near)
    summary = {"rows": int(len(exact)), "near": int(near.sum()), "seconds": time.time() - started}
    names = ["exact.npy", "signatures.npy", "bands.npy", "near.npy"]
    return {**finish_unit(directory, summary, names), "reused": False}


def write_dedup_shard(docs: str, out: str, duplicate_rows: list[int], ledger: list[dict]) -> dict:
    """One clean shard minus its duplicate rows into `docs.parquet`, its ledger rows into
    `duplicates.parquet`."""
    directory = Path(out)
    if (done := read_done(directory)) is not None:
        return {**done, "reused": True}
    started = time.time()
    start_unit(directory)
    source = pq.ParquetFile(docs)
    if duplicate_rows or source.schema_arrow.names != list(DOC_COLUMNS):
        table = source.read(use_threads=False)  # the shards themselves run in parallel
        keep = np.ones(table.num_rows, dtype=bool)
        keep[duplicate_rows] = False
        with atomic_path(directory / "docs.parquet") as tmp:
            pq.write_table(table.filter(pa.array(keep)).select(list(DOC_COLUMNS)), tmp,
                           compression="zstd", row_group_size=FLUSH_ROWS)
    else:  # nothing removed: the clean shard itself (same columns, immutable), not a rewrite
        link(Path(docs), directory / "docs.parquet")
        keep = np.ones(source.metadata.num_rows, dtype=bool)
    source.close()
    with atomic_path(directory / "duplicates.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(ledger, schema=DUPLICATE_SCHEMA), tmp, compression="zstd")
    summary = {"kept": int(keep.sum()), "duplicates": len(duplicate_rows),
               "seconds": time.time() - started}
    return {**finish_unit(directory, summary, ["docs.parquet", "duplicates.parquet"]), "reused": False}
