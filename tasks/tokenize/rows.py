"""Reading the tokenize stage's packed rows, without Prefect or the tokenizers library.

The training loader (`tasks.train.loader`), evaluation and registration read token rows through here, so a
training subprocess starts without importing Prefect (seconds per start). `tasks.tokenize.stage` writes the
rows; the directory layout is described there and the row format in `tasks.tokenize.packing`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.protocol import read_manifest

STAGE_NAME = "tokenize"
SPLITS = ("train", "val")
INDEX_DIR = "index"


# ---------------------------------------------------------------------------- reading rows


def _rows_from_binary(chunk: pa.Array, dtype: np.dtype, width: int) -> np.ndarray:
    """[n, width] ids viewing the chunk's data buffer (zero copy, read-only)."""
    if chunk.null_count:
        raise ValueError("tokens column has nulls")
    n = len(chunk)
    offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[chunk.offset: chunk.offset + n + 1]
    row_bytes = width * dtype.itemsize
    if n and not np.all(np.diff(offsets) == row_bytes):
        raise ValueError(f"tokens rows are not all {width} ids of {dtype}")
    if n == 0:
        return np.empty((0, width), dtype=dtype)
    return np.frombuffer(chunk.buffers()[2], dtype=dtype, count=n * width,
                         offset=int(offsets[0])).reshape(n, width)


def _complete_manifest(tokens_dir: Path, split: str) -> dict:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    manifest = read_manifest(tokens_dir)
    if manifest is None or manifest.get("stage") != STAGE_NAME:
        raise FileNotFoundError(f"{tokens_dir} is not a complete tokenize stage directory")
    return manifest


def split_parts(tokens_dir: str | Path, split: str) -> list[dict]:
    """Manifest entries of a split's token files, in row order (the order `read_rows` concatenates)."""
    return _parts(_complete_manifest(Path(tokens_dir), split), split)


def _parts(manifest: dict, split: str) -> list[dict]:
    return [f for f in manifest["files"] if f["path"].startswith(f"{split}/")]


def read_chunks(tokens_dir: str | Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per Arrow chunk: ([n_i, seq_len + 1] zero-copy id views, [n_i] n_bytes int64), in row order."""
    tokens_dir = Path(tokens_dir)
    manifest = _complete_manifest(tokens_dir, split)
    dtype, width = np.dtype(manifest["dtype"]).newbyteorder("<"), manifest["seq_len"] + 1
    tokens, n_bytes = [], []
    for entry in _parts(manifest, split):  # the manifest read once
        table = pq.read_table(tokens_dir / entry["path"], columns=["tokens", "n_bytes"])
        tokens += [_rows_from_binary(c, dtype, width) for c in table.column("tokens").chunks]
        n_bytes.append(table.column("n_bytes").to_numpy().astype(np.int64))
    if not tokens:
        return [np.empty((0, width), dtype=dtype)], [np.empty(0, dtype=np.int64)]
    return tokens, n_bytes


def read_rows(tokens_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, seq_len + 1] in the stage's dtype, n_bytes [N] int64) of one split, files in order.

    Zero copy (and then read-only) when the split is a single Parquet chunk; callers cast batches
    with `.astype(np.int64)`."""
    tokens, n_bytes = read_chunks(tokens_dir, split)
    rows = tokens[0] if len(tokens) == 1 else np.concatenate(tokens)
    return rows, np.concatenate(n_bytes)


def rows_of_documents(tokens_dir: str | Path, split: str, doc_ids: Iterable[str]) -> np.ndarray:
    """Row indices (as `read_rows` numbers them) holding any byte or eos of the given documents."""
    tokens_dir, wanted = Path(tokens_dir), pa.array(sorted(set(doc_ids)), pa.string())
    found, first = [], 0
    for entry in split_parts(tokens_dir, split):
        index = pq.read_table(tokens_dir / INDEX_DIR / entry["path"], columns=["row", "doc_id"])
        hit = pc.is_in(index.column("doc_id"), value_set=wanted)
        found.append(index.column("row").filter(hit).to_numpy().astype(np.int64) + first)
        first += entry["rows"]
    return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
