"""A mixed corpus (code, prose, verse) with planted exact and near copies of known Jaccard similarity.

Built from what every Python install has, so tests and `benchmarks/bench_dedup.py` need no download:
- code: the interpreter's standard library modules (`*.py`, 1-64 kB), real source with its natural
  near twins (the `encodings/cp*.py` tables, generated modules);
- prose: the language reference and library topics that `pydoc` ships (`pydoc_data.topics`), cut at
  paragraph boundaries into 1-6 kB documents;
- verse: generated stanzas of short capitalized lines without terminal punctuation, words drawn from
  that prose (pairwise distinct, like real poems, unlike a text cycling through a few lines).

`extra` adds caller-supplied documents (the benchmark's WikiText articles and Shakespeare chunks).

A near copy is an earlier document with one realistic edit, sized for a target Jaccard drawn
uniformly from `j_range`: words replaced here and there (a reworded copy), a block of lines dropped
(an excerpt), a block of other text inserted (a quoted or patched copy), or a header and footer added
(a page template). Its true word-5-gram Jaccard with the original is then computed exactly (the same
shingles the dedup stage hashes: lowercased, split on ASCII whitespace). An exact copy differs from
its original in whitespace only. Copies come after their originals in document order.
"""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from planted_corpus import jaccard  # word-5-gram Jaccard, as the dedup stage shingles

KINDS = ("reworded", "excerpt", "inserted", "template")


def code_documents(limit: int | None, rng: random.Random) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                   and 1024 <= p.stat().st_size <= 65536)
    if limit is not None and limit < len(files):
        files = sorted(rng.sample(files, limit))
    docs = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append({"id": f"code/{p.relative_to(root).as_posix()}", "text": text, "source": "code"})
    return docs


def prose_documents(limit: int | None, rng: random.Random) -> list[dict]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        chunk: list[str] = []
        for para in topics[name].split("\n\n"):
            chunk.append(para)
            if sum(len(c) for c in chunk) >= 6000:
                docs.append("\n\n".join(chunk))
                chunk = []
        if sum(len(c) for c in chunk) >= 1000:
            docs.append("\n\n".join(chunk))
    out = [{"id": f"prose/{i:04d}", "text": t, "source": "prose"} for i, t in enumerate(docs)]
    return sorted(rng.sample(out, limit), key=lambda d: d["id"]) if limit is not None and limit < len(out) else out


def verse_documents(count: int, rng: random.Random, words: list[str]) -> list[dict]:
    docs = []
    for i in range(count):
        stanzas = []
        for _ in range(rng.randint(4, 12)):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))).capitalize()
                     for _ in range(rng.randint(4, 8))]
            stanzas.append("\n".join(lines))
        docs.append({"id": f"verse/{i:04d}", "text": f"{rng.choice(words).upper()}\n\n" + "\n\n".join(stanzas),
                     "source": "verse"})
    return docs


def near_copy(rng: random.Random, text: str, target: float, kind: str, filler: str) -> str:
    """`text` edited by `kind` so that its word-5-gram Jaccard with `text` is about `target`."""
    lines = text.split("\n")
    words = sum(len(line.split()) for line in lines)
    if kind == "reworded":  # k single-word substitutions each break ~5 shingles
        k = max(1, round(words * (1 - target) / (5 * (1 + target))))
        flat = [(i, j) for i, line in enumerate(lines) for j, _ in enumerate(line.split(" "))
                if line.split(" ")[j].strip()]
        split = [line.split(" ") for line in lines]
        for i, j in rng.sample(flat, min(k, len(flat))):
            split[i][j] = split[i][j] + "ed" if rng.random() < 0.5 else rng.choice(filler.split() or ["x"])
        return "\n".join(" ".join(s) for s in split)
    fraction = 1 - target
    if kind == "excerpt":  # a contiguous block of lines dropped: J ~ 1 - fraction
        drop = round(len(lines) * fraction)
        start = rng.randrange(0, len(lines) - drop + 1)
        return "\n".join(lines[:start] + lines[start + drop:])
    extra_words = round(words * fraction / target)  # J ~ words / (words + extra)
    block = filler.split()
    start = rng.randrange(0, max(1, len(block) - extra_words))
    added = " ".join(block[start:start + extra_words])
    added = "\n".join(added[i:i + 72] for i in range(0, len(added), 72))
    if kind == "inserted":
        at = rng.randrange(0, len(lines) + 1)
        return "\n".join(lines[:at] + [added] + lines[at:])
    half = len(added) // 2  # template: header and footer
    return added[:half] + "\n" + text + "\n" + added[half:]


def mixed_corpus(seed: int = 0, code: int | None = 200, prose: int | None = 60, verse: int = 40,
                 near: int = 80, exact: int = 10, j_range: tuple[float, float] = (0.5, 1.0),
                 extra: list[dict] | None = None) -> tuple[list[dict], dict[str, tuple[str, float, str]]]:
    """Documents (id, text, source) and the truth {copy id: (original id, true Jaccard, kind)}, the
    kind being `exact` or one of `KINDS`. None for `code` or `prose` takes all there is."""
    rng = random.Random(seed)
    prose_docs = prose_documents(prose, rng)
    vocabulary = sorted({w.strip(".,;:()`'\"").lower() for d in prose_docs for w in d["text"].split()
                         if w.isascii() and w.strip(".,;:()`'\"").isalpha() and len(w) > 2})
    docs = code_documents(code, rng) + prose_docs + verse_documents(verse, rng, vocabulary) + list(extra or [])
    filler_pool = [d["text"] for d in prose_docs] or ["lorem ipsum " * 500]
    truth: dict[str, tuple[str, float, str]] = {}
    copies = []
    for i in range(near):
        orig = docs[rng.randrange(len(docs))]
        kind = KINDS[i % len(KINDS)]
        target = rng.uniform(*j_range)
        filler = " ".join(rng.choice(filler_pool) for _ in range(8))
        text = near_copy(rng, orig["text"], target, kind, filler)
        true_j = jaccard(orig["text"], text)
        copy = {"id": f"near/{i:05d}", "text": text, "source": orig["source"]}
        truth[copy["id"]] = (orig["id"], true_j, kind)
        copies.append(copy)
    for i in range(exact):
        orig = docs[rng.randrange(len(docs))]
        copy = {"id": f"exact/{i:05d}", "text": "  " + orig["text"].replace(" ", "  "), "source": orig["source"]}
        truth[copy["id"]] = (orig["id"], 1.0, "exact")
        copies.append(copy)
    # copies come after every original, interleaved among themselves
    rng.shuffle(copies)
    return docs + copies, truth


BUCKETS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.9), (0.9, 1.0001))


def score(docs: list[dict], truth: dict, removed: dict[str, str], false_below: float = 0.7) -> dict:
    """Recall of the planted copies by true-Jaccard bucket, and the removals that were wrong.

    `removed` maps each removed id to the document it was removed for (the ledger's
    `duplicate_of`). A removed document that is not a planted copy counts as a false removal when
    its true Jaccard with that document is below `false_below`; above it, it is a natural near copy
    the corpus already held (reported, not counted against the method)."""
    near = {i: t for i, t in truth.items() if t[2] != "exact"}
    out: dict = {"docs": len(docs), "planted_near": len(near),
                 "exact_found": f"{sum(i in removed for i, t in truth.items() if t[2] == 'exact')}/"
                                f"{sum(t[2] == 'exact' for t in truth.values())}"}
    for lo, hi in BUCKETS:
        ids = [i for i, t in near.items() if lo <= t[1] < hi]
        out[f"recall_{lo:.2f}-{min(hi, 1):.2f}"] = round(sum(i in removed for i in ids) / len(ids), 4) if ids else None
        out[f"n_{lo:.2f}-{min(hi, 1):.2f}"] = len(ids)
    high = [i for i, t in near.items() if t[1] >= 0.75]
    out["recall_j>=0.75"] = round(sum(i in removed for i in high) / len(high), 4) if high else None
    text = {d["id"]: d["text"] for d in docs}
    others = [i for i in removed if i not in truth]
    similarity = {i: jaccard(text[i], text[removed[i]]) for i in others}
    false = sorted(i for i, j in similarity.items() if j < false_below)
    distinct = len(docs) - len(truth)
    out["natural_near_removed"] = len(others) - len(false)
    out["false_removals"] = len(false)
    out["false_removal_rate"] = round(len(false) / distinct, 5) if distinct else 0.0
    out["false_examples"] = [(i, removed[i], round(similarity[i], 3)) for i in false[:5]]
    return out
