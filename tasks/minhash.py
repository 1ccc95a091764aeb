"""MinHash signatures over word n-gram shingles and LSH band keys, vectorized with numpy.

Two signature methods with the same output shape (`bands * rows` uint32 values per document):
`oph` (default), one permutation hashing with optimal densification, hashes each shingle once;
`permutations`, classic MinHash, hashes each shingle `bands * rows` times.

Why not a library: datasketch hashes every shingle with sha1 through Python calls and updates one
document at a time; rensa is not installed here. Here the words of a whole batch of documents are
hashed at once without a Python call per word (`word_hashes`: polynomial hashes read off numpy
prefix sums, then MurmurHash3's finalizer; per-word `xxh3_64` calls cost more than all the numpy
passes together, bench_dedup.py's profile), shingle hashes are combined from word hashes with
numpy arithmetic, and `oph` needs one more hash per shingle instead of 112. xxhash (well kept,
fast C) still gives the 128-bit exact-duplicate keys (`exact_key`), one call per document.
The `permutations` method applies `(a * x + b) >> 32` multiply-shift hashing
(Dietzfelbinger et al. 1997) with random odd 64-bit `a` to a (hashes x shingles) array. Both give
unbiased Jaccard estimates (tests/tasks/test_minhash.py); `benchmarks/bench_dedup.py` compares them
with datasketch on the same corpus.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

SHINGLE_MULT = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio odd constant: mixes word positions
BAND_MULT = np.uint64(0xC2B2AE3D27D4EB4F)
CHUNK = 1 << 14
"""Shingles hashed at a time: a (hashes x CHUNK) uint64 block is ~14 MB for 112 hashes."""
EMPTY = np.iinfo(np.uint32).max


def hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of `num_perm` multiply-shift hash functions: a odd, both uint64."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


BATCH_BYTES = 1 << 20
"""Text bytes hashed at a time (bounded memory for any shard; a longer text goes alone)."""
WORD_BASE = 0x9E3779B97F4A7C15
"""Odd, so invertible modulo 2^64: a word's polynomial hash is read off prefix sums."""
_POWERS: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(WORD_BASE^j, WORD_BASE^-j) mod 2^64 for j < n, cached and grown by doubling."""
    if len(_POWERS.get("up", ())) < n:
        size = max(n, 2 * len(_POWERS.get("up", ())), 1 << 16)
        for name, base in (("up", WORD_BASE), ("down", pow(WORD_BASE, -1, 1 << 64))):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            _POWERS[name] = np.cumprod(table, dtype=np.uint64)  # wraps modulo 2^64
    return _POWERS["up"][:n], _POWERS["down"][:n]


def word_hashes(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, start offset) of every ASCII-whitespace-separated word of `buf`, vectorized:
    a polynomial hash sum((b_j + 1) * B^(j - start)) from prefix sums, its length mixed in, then
    MurmurHash3's finalizer. Equal words hash equal wherever they stand. Prefix sums run over runs
    of whole words of about `BATCH_BYTES`, so one huge text costs no more memory than a batch."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    inside = np.zeros(len(arr) + 2, dtype=bool)
    # not ASCII whitespace (what bytes.split() splits on): space, or \t \n \v \f \r (9..13)
    np.logical_and(arr != 32, (arr - np.uint8(9)) > 4, out=inside[1:-1])
    change = np.flatnonzero(inside[1:] != inside[:-1])  # word starts and ends, alternating
    starts, ends = change[0::2], change[1::2]
    raw = np.empty(len(starts), dtype=np.uint64)
    cuts = np.unique(np.searchsorted(starts, np.arange(0, len(arr) + BATCH_BYTES, BATCH_BYTES)))
    for i0, i1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        lo, hi = int(starts[i0]), int(ends[i1 - 1])
        up, down = _powers(hi - lo + 1)
        prefix = np.zeros(hi - lo + 1, dtype=np.uint64)
        x = arr[lo:hi].astype(np.uint64)
        x += np.uint64(1)
        x *= up[:hi - lo]
        np.cumsum(x, out=prefix[1:])
        s, e = starts[i0:i1] - lo, ends[i0:i1] - lo
        raw[i0:i1] = (prefix[e] - prefix[s]) * down[s]
    return fmix64(raw ^ ((ends - starts).astype(np.uint64) * BAND_MULT)), starts


def shingle_hashes_batch(texts: Sequence[str], ngram: int) -> list[np.ndarray]:
    """uint64 hashes of the lowercased word n-grams of each text (empty when fewer words than n).
    Words are hashed for a whole batch of texts at once (`word_hashes`, no Python call per word);
    n-grams never cross two texts."""
    out: list[np.ndarray] = []
    i = 0
    while i < len(texts):
        batch: list[bytes] = []
        size = 0
        while i < len(texts) and (not batch or size < BATCH_BYTES):
            batch.append(texts[i].lower().encode("utf-8"))
            size += len(batch[-1]) + 1
            i += 1
        w, starts = word_hashes(b"\n".join(batch))  # the newline keeps words of two texts apart
        doc_starts = np.cumsum([0] + [len(b) + 1 for b in batch])
        per_doc = np.diff(np.searchsorted(starts, doc_starts))  # words of each text
        doc = np.repeat(np.arange(len(batch)), per_doc)
        m = len(w) - ngram + 1
        if m <= 0:
            out += [np.empty(0, dtype=np.uint64)] * len(batch)
            continue
        h = w[:m].copy()
        for k in range(1, ngram):
            h *= SHINGLE_MULT
            h ^= w[k:k + m]
        h ^= h >> np.uint64(29)  # spread high bits of the polynomial into the low ones
        valid = doc[:m] == doc[ngram - 1:]
        h, hdoc = h[valid], doc[:m][valid]
        bounds = np.searchsorted(hdoc, np.arange(len(batch) + 1))
        out += [h[bounds[j]:bounds[j + 1]] for j in range(len(batch))]
    return out


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint64 hashes of the lowercased word n-grams of one text."""
    return shingle_hashes_batch([text], ngram)[0]


def _min_hash(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(num_perm, len(x)) uint32 hash values of shingles `x` under every hash function."""
    return ((a[:, None] * x[None, :] + b[:, None]) >> np.uint64(32)).astype(np.uint32)


def signatures(shingles: Sequence[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(docs, num_perm) uint32 MinHash signatures; a document without shingles gets all EMPTY."""
    out = np.full((len(shingles), len(a)), EMPTY, dtype=np.uint32)
    batch: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            x = np.concatenate([shingles[i] for i in batch])
            starts = np.cumsum([0] + [len(shingles[i]) for i in batch[:-1]])
            out[batch] = np.minimum.reduceat(_min_hash(x, a, b), starts, axis=1).T
        batch, size = [], 0

    for i, s in enumerate(shingles):
        if len(s) == 0:
            continue
        if len(s) > CHUNK:  # one large document: running minimum over chunks
            flush()
            sig = out[i]
            for start in range(0, len(s), CHUNK):
                np.minimum(sig, _min_hash(s[start:start + CHUNK], a, b).min(axis=1), out=sig)
            continue
        if size + len(s) > CHUNK:
            flush()
        batch.append(i)
        size += len(s)
    flush()
    return out


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def probe_table(num_perm: int, seed: int, probes: int = 256) -> np.ndarray:
    """(num_perm, probes) bins an empty bin borrows from, in order: the same for every document."""
    rng = np.random.Generator(np.random.PCG64(seed + 7919))
    return rng.integers(0, num_perm, size=(num_perm, probes))


def oph_signatures(shingles: Sequence[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    """(docs, num_perm) uint32 signatures by one permutation hashing (Li, Owen & Zhang 2012) with
    optimal densification (Shrivastava 2017): one hash per shingle picks a bin (high bits) and a
    value (low bits), a bin keeps its minimum, and an empty bin borrows the value of the first
    non-empty bin of its fixed probe sequence. The collision probability of a position is the
    Jaccard similarity, as with `num_perm` independent permutations, for 1/num_perm of the work."""
    d = len(shingles)
    out = np.full((d, num_perm), EMPTY, dtype=np.uint32)
    lengths = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=d)
    if d == 0 or lengths.sum() == 0:
        return out
    h = fmix64(np.concatenate(shingles) ^ np.uint64(xxhash.xxh64_intdigest(str(seed).encode())))
    doc = np.repeat(np.arange(d, dtype=np.int64), lengths)
    bins = (((h >> np.uint64(32)) * np.uint64(num_perm)) >> np.uint64(32)).astype(np.int64)
    np.minimum.at(out.reshape(-1), doc * num_perm + bins, (h & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    empty = (out == EMPTY) & (lengths > 0)[:, None]
    if empty.any():
        rows = np.flatnonzero(empty.any(axis=1))
        raw, sub, todo = out[rows], out[rows].copy(), empty[rows]
        for column in probe_table(num_perm, seed).T:
            borrowed = raw[:, column]
            fill = todo & (borrowed != EMPTY)
            sub[fill] = borrowed[fill]
            todo &= ~fill
            if not todo.any():
                break
        for r, j in zip(*np.nonzero(todo)):  # probes exhausted (a handful of shingles): next bin right
            nz = np.flatnonzero(raw[r] != EMPTY)
            sub[r, j] = raw[r, nz[np.searchsorted(nz, j) % len(nz)]]
        out[rows] = sub
    return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(docs, bands) uint64 keys: documents share a key when the band's `rows` values all agree."""
    d = sig.shape[0]
    parts = sig[:, : bands * rows].reshape(d, bands, rows).astype(np.uint64)
    key = np.zeros((d, bands), dtype=np.uint64)
    for r in range(rows):
        key *= BAND_MULT
        key ^= parts[:, :, r] + np.uint64(r + 1)
    return key


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values, row by row: an unbiased Jaccard estimate."""
    return (sig_a == sig_b).mean(axis=-1)


def exact_key(text: str, normalize_whitespace: bool, lowercase: bool) -> bytes:
    """128-bit xxh3 of the text as compared: whitespace runs collapsed, optionally lowercased."""
    if normalize_whitespace:
        text = " ".join(text.split())
    if lowercase:
        text = text.lower()
    return xxhash.xxh3_128_digest(text.encode("utf-8"))
