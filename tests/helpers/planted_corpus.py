"""A generated corpus with planted exact and near duplicates of known Jaccard similarity.

Used by the dedup tests, the data flow test and `benchmarks/bench_dedup.py`. Base documents are
prose-like lines of random words (pairwise Jaccard ~0); a near duplicate is a base document with
`k` words replaced, and its true Jaccard over word 5-gram shingles is computed exactly.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from tasks.core.protocol import StageResult, file_entry, prepare_dir, stable_hash, write_manifest

STOP = ["the", "of", "and", "to", "with", "that", "have", "be"]


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def base_doc(rng: random.Random, vocab: list[str], words: int) -> str:
    out, line = [], []
    for i in range(words):
        line.append(rng.choice(STOP) if i % 4 == 0 else rng.choice(vocab))
        if len(line) >= 12:
            out.append(" ".join(line) + ".")
            line = []
    if line:
        out.append(" ".join(line) + ".")
    return "\n".join(out) + "\n"


def edit(rng: random.Random, vocab: list[str], text: str, k: int) -> str:
    """`text` with `k` distinct word positions replaced by other words, line structure kept."""
    lines = [line.split(" ") for line in text.rstrip("\n").split("\n")]
    flat = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    for i, j in rng.sample(flat, k):
        lines[i][j] = rng.choice(vocab) + "x"  # never equal to the original word
    return "\n".join(" ".join(line) for line in lines) + "\n"


def shingles(text: str, n: int = 5) -> set[bytes]:
    w = text.lower().encode("utf-8").split()
    return {b" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def planted(seed: int = 0, distinct: int = 400, words: tuple[int, int] = (150, 400),
            near: int = 160, exact: int = 20) -> tuple[list[dict], dict]:
    """Documents (id, text, source) and the truth: {dup id: (original id, true jaccard, kind)}.

    Near duplicates get 1..40 edited words (Jaccard from ~0.98 down to ~0.4); every planted copy
    comes after its original in document order."""
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    docs = [{"id": f"base-{i:05d}", "text": base_doc(rng, vocab, rng.randint(*words)), "source": "gen"}
            for i in range(distinct)]
    truth: dict[str, tuple[str, float, str]] = {}
    extra = []
    for i in range(near):
        orig = docs[rng.randrange(distinct)]
        text = edit(rng, vocab, orig["text"], rng.choice([1, 1, 2, 2, 3, 4, 6, 10, 20, 40]))
        doc = {"id": f"near-{i:05d}", "text": text, "source": "gen"}
        truth[doc["id"]] = (orig["id"], jaccard(orig["text"], text), "near")
        extra.append(doc)
    for i in range(exact):
        orig = docs[rng.randrange(distinct)]
        doc = {"id": f"exact-{i:05d}", "text": "  " + orig["text"].replace(" ", "  "), "source": "gen"}
        truth[doc["id"]] = (orig["id"], 1.0, "exact")
        extra.append(doc)
    return docs + extra, truth


def write_clean_upstream(docs: list[dict], root: Path, per_shard: int) -> StageResult:
    """A complete clean-stage directory holding `docs` in shards of `per_shard` rows."""
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
    fp = stable_hash([d["id"] for d in docs] + [per_shard, str(root)])
    directory = Path(root) / "clean" / fp
    prepare_dir(directory)
    entries = []
    for i in range(0, max(len(docs), 1), per_shard):
        path = directory / f"docs-{i // per_shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(docs[i:i + per_shard], schema=schema), path)
        entries.append(file_entry(path, directory, rows=len(docs[i:i + per_shard])))
    counts = {"docs_in": len(docs), "kept": len(docs)}
    write_manifest(directory, stage="clean", fp=fp, code="test", config={}, inputs=[], counts=counts,
                   files=entries, started=time.time())
    return StageResult(stage="clean", fingerprint=fp, path=str(directory), counts=counts)


def write_raw_upstream(docs: list[dict], root: Path, per_shard: int) -> StageResult:
    """A complete download-stage directory of zstd jsonl shards of `per_shard` documents."""
    fp = stable_hash([d["id"] for d in docs] + [d["text"] for d in docs] + [per_shard])
    directory = Path(root) / "download" / fp
    prepare_dir(directory)
    entries = []
    for i in range(0, len(docs), per_shard):
        path = directory / f"shard-{i // per_shard:05d}.jsonl.zst"
        blob = "".join(json.dumps({**d, "meta": {}}) + "\n" for d in docs[i:i + per_shard])
        path.write_bytes(zstandard.ZstdCompressor().compress(blob.encode("utf-8")))
        entries.append(file_entry(path, directory, rows=len(docs[i:i + per_shard])))
    counts = {"docs": len(docs)}
    write_manifest(directory, stage="download", fp=fp, code="test", config={}, inputs=[],
                   counts=counts, files=entries, started=time.time())
    return StageResult(stage="download", fingerprint=fp, path=str(directory), counts=counts)


def write_text_files(docs: list[dict], root: Path) -> Path:
    """One `<id>.txt` per document under `root`: a local corpus directory for `corpus.sources`."""
    root.mkdir(parents=True, exist_ok=True)
    for d in docs:
        (root / f"{d['id']}.txt").write_text(d["text"])
    return root
