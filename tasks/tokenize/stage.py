"""Tokenize stage: a byte-level BPE (trained here or loaded), a deterministic split, packed token rows.

Output, `<workspace>/tokenize/<fp>/`:

    tokenizer.json                         the tokenizer every row was encoded with
    train/part-UUUUU-KKKK.parquet ...      packed rows (columns `tokens`, `n_bytes`), zstd
    val/part-UUUUU-KKKK.parquet ...
    index/<split>/part-UUUUU-KKKK.parquet  side table: row -> document ids and byte ranges
    .units/tokenizer.json                  marker: the saved tokenizer.json and its name (resume)
    .units/unit-UUUUU.json                 marker: one input file's rows and counts (resume)
    manifest.json                          written last (see tasks/core/protocol.py)

Input unit U is the U-th `docs-*.parquet` of the upstream stage. The tokenizer comes from `tasks.tokenize.bpe`
(trained on a sample of the train split, or loaded from `tokenizer_source`); `tasks.tokenize.packing` decides
each document's split and mixture copies and packs each (unit, split) stream into rows. Copy c of a
unit comes in pass c over the unit, so copies of a document are a whole unit apart. Units are
independent, so a rerun after a crash keeps the units whose record and files are intact. Schema
metadata `neo.*` names the schema, tokenizer, vocab size, eos id and context length; the stage checks
that the n_bytes of all rows plus the bytes of the dropped tails equal the bytes of the drawn
documents. `tasks.tokenize.rows` reads the rows back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from tasks.tokenize.bpe import (TOKENIZER_FILE, encode_docs, fetch_tokenizer_source, load_tokenizer, parallelism,
                       source_sha256, token_byte_lengths, token_dtype, tokenizer_from_files, train_tokenizer)
from tasks.core.data_config import TokenizerConfig
from tasks.tokenize.packing import SplitWriter, copies, is_val
from tasks.core.protocol import (Computed, Stage, StageResult, atomic_path, check_accounting, file_entry,
                                 prepare_dir, read_marker, run_stage, sha256_file, write_marker)
from tasks.tokenize.rows import INDEX_DIR, SPLITS, STAGE_NAME

STAGE = Stage(STAGE_NAME, version=2, module=__name__, section="tokenizer", inputs=("dedup",),
              info_keys=("vocab_size", "eos_id", "seq_len", "dtype", "train_bytes", "val_bytes",
                         "tokenizer_sha256", "tokenizer_name", "tail_tokens_dropped", "sources"))
SCHEMA_NAME = "neo-tokens/1"
UNITS_DIR = ".units"
READ_BATCH_ROWS = 256
"""Documents per Parquet read batch and per `encode_batch` call (documents can be up to ~1 MB)."""


def _inputs(cfg: TokenizerConfig, upstream: StageResult) -> list[str]:
    inputs = [upstream.fingerprint]
    if cfg.tokenizer_source is not None:
        fetched = fetch_tokenizer_source(cfg.tokenizer_source, *cfg.source_secrets())
        inputs.append(f"tokenizer:{source_sha256(fetched)}")
    return inputs


def plan(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return STAGE.plan(cfg, _inputs(cfg, upstream), workspace)


# ---------------------------------------------------------------------------- input


def _doc_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob("docs-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no docs-*.parquet files in {directory}")
    return files


def _iter_batches(path: Path) -> Iterator[tuple[list[str], list[str], pa.Array]]:
    """(ids, source labels, text column) per read batch of one docs file."""
    pf = pq.ParquetFile(path)
    has_source = "source" in pf.schema_arrow.names
    columns = ["id", "text"] + (["source"] if has_source else [])
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
        ids = batch.column("id").to_pylist()
        sources = [s or "" for s in batch.column("source").to_pylist()] if has_source else [""] * len(ids)
        yield ids, sources, batch.column("text")


def _train_sample(files: list[Path], cfg: TokenizerConfig) -> Iterator[str]:
    """Train-split texts in corpus order until `train_sample_bytes` UTF-8 bytes (the last one cut)."""
    left = cfg.train_sample_bytes
    for path in files:
        for ids, _, texts in _iter_batches(path):
            for doc_id, text in zip(ids, texts.to_pylist()):
                if is_val(doc_id, cfg.val_fraction, cfg.split_seed):
                    continue
                data = text.encode("utf-8")
                if len(data) >= left:
                    yield data[:left].decode("utf-8", errors="ignore")  # cut on a character boundary
                    return
                left -= len(data)
                yield text


# ---------------------------------------------------------------------------- the stage


def _unit_marker(out: Path, unit: int) -> Path:
    return out / UNITS_DIR / f"unit-{unit:05d}.json"


def _tokenizer_marker(out: Path) -> Path:
    return out / UNITS_DIR / "tokenizer.json"


def _resume(out: Path, n_units: int) -> dict[int, dict]:
    """Keep the finished units of a partial run (same fingerprint, same tokenizer.json); delete the
    rest. Without an intact tokenizer.json (its marker's size and sha256) the directory starts afresh."""
    tok = read_marker(_tokenizer_marker(out), out)
    if tok is None or sha256_file(out / TOKENIZER_FILE) != tok["files"][0]["sha256"]:
        prepare_dir(out)
        return {}
    sha, done = tok["files"][0]["sha256"], {}
    for unit in range(n_units):
        record = read_marker(_unit_marker(out, unit), out)
        if record is not None and record.get("tokenizer_sha256") == sha:
            done[unit] = record
    keep = {out / TOKENIZER_FILE, _tokenizer_marker(out)} | {_unit_marker(out, u) for u in done}
    keep |= {out / f["path"] for r in done.values() for f in r["files"]}
    for path in sorted(out.rglob("*"), reverse=True):
        if path.is_file() and path not in keep:
            path.unlink()
    return done


def _tokenizer_for(cfg: TokenizerConfig, files: list[Path]) -> tuple[Tokenizer, str]:
    """(the tokenizer to save, its name) - loaded from `tokenizer_source` or trained here."""
    if cfg.tokenizer_source is not None:
        fetched = fetch_tokenizer_source(cfg.tokenizer_source, *cfg.source_secrets())
        name = f"{cfg.tokenizer_source} ({'+'.join(sorted(fetched))})"
        return tokenizer_from_files(fetched, cfg.eos_token), name
    return (train_tokenizer(_train_sample(files, cfg), cfg.vocab_size, cfg.eos_token),
            f"byte-level BPE trained here, vocab {cfg.vocab_size}")


def _weight(cfg: TokenizerConfig, source: str) -> float:
    return cfg.mixture.get(source, 1.0)


def _encode_unit(out: Path, unit: int, path: Path, cfg: TokenizerConfig, tokenizer: Tokenizer,
                 tokenizer_sha: str, eos_id: int, dtype: np.dtype, byte_len: np.ndarray,
                 metadata: dict[bytes, bytes]) -> dict:
    """Tokenize one docs file into its own rows; its record is written last."""
    writers = {s: SplitWriter(out, s, unit, cfg, eos_id, dtype, byte_len, metadata) for s in SPLITS}
    docs = {"docs_in": 0, "train": 0, "val": 0, "train_unused": 0}
    passes = max(1, math.ceil(max([1.0, *cfg.mixture.values()])))
    for copy in range(passes):
        for ids, sources, texts in _iter_batches(path):
            is_v = [is_val(i, cfg.val_fraction, cfg.split_seed) for i in ids]
            n = [0 if v else copies(i, _weight(cfg, s), cfg.mixture_seed)
                 for i, s, v in zip(ids, sources, is_v)]
            if copy == 0:
                docs["docs_in"] += len(ids)
                docs["val"] += sum(is_v)
                docs["train"] += len(ids) - sum(is_v)
                docs["train_unused"] += sum(1 for v, k in zip(is_v, n) if not v and k == 0)
            sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
            batch = None
            for split in SPLITS:
                sel = np.array(is_v, bool) if split == "val" else np.array(n, np.int64) > copy
                if split == "val" and copy > 0 or not sel.any():
                    continue
                batch = texts.to_pylist() if batch is None else batch
                pick = np.flatnonzero(sel)
                stream, lengths = encode_docs(tokenizer, [batch[j] for j in pick], eos_id, dtype)
                writers[split].add(stream, lengths, [ids[j] for j in pick], [sources[j] for j in pick],
                                   sizes[pick], copy)
    splits = {s: w.finish() for s, w in writers.items()}
    files = [{"path": f["path"], "bytes": f["bytes"]} for s in SPLITS for f in splits[s]["files"]]
    return write_marker(_unit_marker(out, unit), files, unit=unit, input=path.name,
                        tokenizer_sha256=tokenizer_sha, docs=docs, **splits)


def _sum_sources(records: list[dict], split: str) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for r in records:
        for src, acc in r[split]["sources"].items():
            into = total.setdefault(src, {"docs": 0, "bytes": 0, "tokens": 0})
            for k, v in acc.items():
                into[k] += v
    return dict(sorted(total.items()))


def run_tokenize(cfg: TokenizerConfig, upstream: StageResult, workspace: str) -> StageResult:
    """Load or train the tokenizer and write packed rows, unless a complete output directory exists;
    a partial one keeps its finished units."""
    inputs = _inputs(cfg, upstream)
    return run_stage(STAGE, STAGE.plan(cfg, inputs, workspace), config=cfg, inputs=inputs,
                     upstream=[upstream], resume=True, compute=lambda out: _tokenize(cfg, upstream, out))


def _tokenize(cfg: TokenizerConfig, upstream: StageResult, out: Path) -> Computed:
    files = _doc_files(upstream.path)
    done = _resume(out, len(files))
    with parallelism():
        if (marker := read_marker(_tokenizer_marker(out), out)) is not None:
            name = marker["name"]
        else:
            tokenizer, name = _tokenizer_for(cfg, files)
            with atomic_path(out / TOKENIZER_FILE) as tmp:
                tokenizer.save(str(tmp))
            write_marker(_tokenizer_marker(out), [file_entry(out / TOKENIZER_FILE, out)], name=name)
        tokenizer = load_tokenizer(out)  # encode with exactly what was saved
        tokenizer_sha = sha256_file(out / TOKENIZER_FILE)
        vocab_size, eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(cfg.eos_token)
        dtype, byte_len = token_dtype(vocab_size), token_byte_lengths(tokenizer)  # once, not per unit
        metadata = {f"neo.{k}".encode(): str(v).encode() for k, v in {
            "schema": SCHEMA_NAME, "tokenizer": name, "tokenizer_sha256": tokenizer_sha,
            "vocab_size": vocab_size, "eos_id": eos_id, "eos_token": cfg.eos_token,
            "seq_len": cfg.seq_len, "dtype": dtype.name}.items()}
        records = [done[u] if u in done else
                   _encode_unit(out, u, path, cfg, tokenizer, tokenizer_sha, eos_id, dtype, byte_len, metadata)
                   for u, path in enumerate(files)]

    split = {s: {k: sum(r[s][k] for r in records) for k in ("draws", "bytes", "tokens", "rows",
                                                            "tail_tokens", "tail_bytes")} for s in SPLITS}
    docs = {k: sum(r["docs"][k] for r in records) for k in ("docs_in", "train", "val", "train_unused")}
    counts = {"docs_in": docs["docs_in"], "train_docs": docs["train"], "val_docs": docs["val"],
              "train_docs_unused": docs["train_unused"], "train_draws": split["train"]["draws"],
              "train_rows": split["train"]["rows"], "val_rows": split["val"]["rows"],
              "train_tokens": split["train"]["tokens"], "val_tokens": split["val"]["tokens"]}
    check_accounting(counts, docs["docs_in"], ["train_docs", "val_docs"], STAGE.name)
    for s in SPLITS:
        if split[s]["rows"] == 0:
            raise ValueError(
                f"tokenize: the {s} split has no rows of tokenizer.seq_len={cfg.seq_len} + 1 tokens "
                f"({docs[s]} of {docs['docs_in']} documents, {split[s]['tokens']} tokens at "
                f"tokenizer.val_fraction={cfg.val_fraction}); raise tokenizer.val_fraction, lower "
                f"tokenizer.seq_len or add documents")
    entries = [file_entry(out / TOKENIZER_FILE, out)]
    for s in SPLITS:
        entries += [f for r in records for f in r[s]["files"] if f["path"].startswith(f"{s}/")]
    entries += [f for s in SPLITS for r in records for f in r[s]["files"] if f["path"].startswith(INDEX_DIR)]
    return Computed(counts, entries, info=dict(
        schema=SCHEMA_NAME, tokenizer_name=name, vocab_size=vocab_size, eos_id=eos_id,
        seq_len=cfg.seq_len, dtype=dtype.name,
        train_bytes=split["train"]["bytes"], val_bytes=split["val"]["bytes"],
        tokenizer_sha256=tokenizer_sha,
        tail_tokens_dropped={s: split[s]["tail_tokens"] for s in SPLITS},
        tail_bytes_dropped={s: split[s]["tail_bytes"] for s in SPLITS},
        sources={s: _sum_sources(records, s) for s in SPLITS}))


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report lines of a tokenize result."""
    c, info = result.counts, result.info
    line = (f"tokenize: {c['train_rows']:,} train / {c['val_rows']:,} val rows of {info['seq_len']} "
            f"from {c['docs_in']:,} documents, vocab {info['vocab_size']:,} (reused: {result.reused})")
    per_source = [f"- {s} {src}: {a['docs']:,} docs drawn, {a['bytes']:,} bytes, {a['tokens']:,} tokens"
                  for s, by in info.get("sources", {}).items() for src, a in by.items()]
    return line, [
        f"- tokenizer: {info.get('tokenizer_name', '')}",
        f"- vocabulary: {info['vocab_size']:,} ({info['dtype']}), eos id {info['eos_id']}",
        f"- bytes per token: train {info['train_bytes'] / max(c['train_tokens'], 1):.2f}, "
        f"val {info['val_bytes'] / max(c['val_tokens'], 1):.2f}",
        f"- tail tokens dropped: {info['tail_tokens_dropped']}",
        f"- tokenizer.json sha256: `{info['tokenizer_sha256']}`", *per_source]
