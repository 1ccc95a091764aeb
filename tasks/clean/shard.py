"""The clean stage's unit: one raw shard -> `docs.parquet` + `rejected.parquet` (a worker process).

Runs in spawned workers, so it imports no Prefect; the unit directory protocol (content-addressed
name, `manifest.json` written last) is `tasks/core/units.py`'s.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from tasks.clean.filters import LINE_RULES, Cleaned, clean_document, fixer_config, nonblank_lines
from tasks.core.data_config import CleanConfig
from tasks.core.units import DOC_SCHEMA, ParquetSink, finish_unit, read_done, start_unit
from tasks.download.readers import read_shard

LENGTH_BINS = 24
"""Document length histogram bins: bin k holds lengths in [2^k, 2^(k+1)) characters (0 in bin 0)."""


def length_bin(n_chars: int) -> int:
    return min(LENGTH_BINS - 1, max(0, n_chars.bit_length() - 1))


REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                           ("value", pa.float64()), ("n_chars", pa.int64()), ("profile", pa.string())])


def clean_shard(cfg: CleanConfig, shard: str, out: str, reasons: Sequence[str]) -> dict:
    """Repair, normalize and filter one raw shard into `docs.parquet` + `rejected.parquet`."""
    directory = Path(out)
    if (done := read_done(directory)) is not None:
        return {**done, "reused": True}
    started = time.time()
    start_unit(directory)
    fixer = fixer_config(cfg)
    counts = {"docs_in": 0, "kept": 0, **{f"rejected:{r}": 0 for r in reasons}}
    stats = {"repaired": 0, "ast_reverted": 0}
    lines_removed = dict.fromkeys(LINE_RULES, 0)
    profiles: dict[str, int] = {}
    by_source: dict[str, dict] = {}  # per source: non-blank lines in, lines removed per rule/reason
    lengths = {"in": [0] * LENGTH_BINS, "kept": [0] * LENGTH_BINS}  # characters per document, log2 bins
    cleaning = 0.0  # seconds in repair, normalization, line rules and filters; the rest is I/O
    with ParquetSink(directory / "docs.parquet", DOC_SCHEMA) as docs, \
            ParquetSink(directory / "rejected.parquet", REJECT_SCHEMA) as rejected:
        for doc in read_shard(Path(shard)):  # a truncated shard raises BrokenStream
            counts["docs_in"] += 1
            lengths["in"][length_bin(len(doc["text"]))] += 1
            t = time.perf_counter()
            out = clean_document(doc["text"], doc["id"], cfg, fixer, doc.get("source"), doc.get("meta"))
            cleaning += time.perf_counter() - t
            profiles[out.profile] = profiles.get(out.profile, 0) + 1
            stats["repaired"] += out.repaired
            stats["ast_reverted"] += out.ast_reverted
            for rule, n in out.lines_removed.items():
                lines_removed[rule] += n
            _count_lines(by_source, doc["source"], out)
            if out.rejection is None:
                docs.add(id=doc["id"], text=out.text, source=doc["source"])
                counts["kept"] += 1
                lengths["kept"][length_bin(len(out.text))] += 1
            else:
                reason, value = out.rejection
                rejected.add(id=doc["id"], source=doc["source"], reason=reason, value=float(value),
                             n_chars=len(out.text), profile=out.profile)
                counts[f"rejected:{reason}"] += 1
    summary = {"counts": counts, **stats, "lines_removed": lines_removed, "profiles": profiles,
               "lines_by_source": by_source, "length_hist": lengths, "seconds": time.time() - started,
               "cleaning_seconds": cleaning}
    return {**finish_unit(directory, summary, ["docs.parquet", "rejected.parquet"]), "reused": False}


def _count_lines(by_source: dict[str, dict], source: str, out: Cleaned) -> None:
    """Lines in, and lines removed by each line rule and (all lines left) by a document's rejection."""
    acc = by_source.setdefault(source, {"lines": 0, "removed": {}, "profiles": {}})
    acc["lines"] += out.lines_in
    acc["profiles"][out.profile] = acc["profiles"].get(out.profile, 0) + 1
    removed = {rule: n for rule, n in out.lines_removed.items() if n}
    if out.rejection is not None and (n := nonblank_lines(out.text)):
        removed[out.rejection[0]] = n
    for rule, n in removed.items():
        acc["removed"][rule] = acc["removed"].get(rule, 0) + n
