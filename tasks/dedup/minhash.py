"""MinHash signatures over word n-gram shingles and LSH band keys, vectorized with numpy.

Two signature methods with the same output shape (`bands * rows` uint32 values per document):
`oph` (default), one permutation hashing with optimal densification, hashes each shingle once;
`permutations`, classic MinHash, hashes each shingle `bands * rows` times.

One pass per batch of texts (`document_hashes`, ~256 kB at a time): each text is encoded once, the
batch is lowercased as one bytes object, words are found by numpy on the bytes and hashed without a
Python call per word (`_hash_words`: a word's bytes read 8 at a time as integers, mixed with
MurmurHash3's finalizer), five word hashes are combined into a shingle hash by multiply-xor, and the
exact-duplicate keys are computed from the same bytes (whitespace collapsed with numpy, one xxh3-128
call per text, equal to `exact_key` text by text; where the batch is ASCII, from the same word runs).
`oph_flat` signs every document of a shard at once, from one flat array of shingle hashes.

Libraries: xxhash (well kept, fast C) gives the 128-bit exact keys and the hash of a rare long word.
datasketch hashes every shingle with sha1 through Python calls, one document at a time. rensa 0.5.0
(Rust; installs from PyPI here, deterministic) was measured on the benchmark corpus (1.43 M
shingles, 112 hashes): fed our shingle hashes (`digest_matrix_from_flat_token_hashes`) it signs in
~14-18 ms (~5 ms with its `rho` sketch) against `oph_flat`'s ~32 ms, but its signatures come out only
as Python lists (`to_rows`), and with the copy to numpy it costs 45-53 ms; fed strings, it needs the
shingle strings built in Python (0.84 s for the corpus, more than this whole stage). So no MinHash
library: the time left is in hashing the text's bytes, which rensa does not do faster.
The `permutations` method applies `(a * x + b) >> 32` multiply-shift hashing
(Dietzfelbinger et al. 1997) with random odd 64-bit `a` to a (hashes x shingles) array. Both give
unbiased Jaccard estimates (tests/tasks/test_minhash.py); `benchmarks/bench_dedup.py` compares them
with datasketch on the same corpus.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

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


BATCH_BYTES = 1 << 18
"""Text bytes hashed at a time: bounded memory for any shard (a longer text goes alone), and arrays
that mostly stay in the CPU's cache (256 kB batches were ~10-15% faster than 1 MB ones here)."""
OPH_CHUNK = 1 << 16
"""Shingles signed at a time by `oph_flat` (cache-sized arrays)."""
LONG_WORD = 128
"""Words of up to this many bytes are hashed by numpy, 8 bytes at a time; longer ones by xxh3."""
_UNICODE_SPACE = [c.encode() for c in map(chr, range(0x80, 0x10000)) if c.isspace()]
"""What `str.split()` splits on beyond ASCII: 2 or 3 UTF-8 bytes each, all in the BMP
(tests/tasks/test_minhash.py checks the whole code space)."""
_SPACE_CODES = {n: np.array(sorted(int.from_bytes(c, "big") for c in _UNICODE_SPACE if len(c) == n),
                            dtype=np.int64) for n in (2, 3)}


def _runs(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of True of `word`, a bool array with one False on either side."""
    change = np.flatnonzero(word[1:] != word[:-1])  # word starts and ends, alternating
    return change[0::2], change[1::2]


def _word_mask(arr: np.ndarray, like_str: bool, ascii: bool = False) -> np.ndarray:
    """True on the bytes of words, with a False added on either side. Words split like
    `bytes.split()` (ASCII space and \\t \\n \\v \\f \\r), or with `like_str` like `str.split()` on
    the decoded text (also \\x1c-\\x1f and, unless the caller knows `arr` is `ascii`, the Unicode
    spaces, `_UNICODE_SPACE`)."""
    word = np.zeros(len(arr) + 2, dtype=bool)
    inner = word[1:-1]
    np.logical_and(arr != 32, (arr - np.uint8(9)) > 4, out=inner)
    if like_str:
        inner &= (arr - np.uint8(28)) > 3
        lead = [] if ascii else np.flatnonzero((arr == 0xC2) | ((arr - np.uint8(0xE1)) <= 2))
        if len(lead):  # in valid UTF-8 these bytes only start characters
            nxt = [arr[np.minimum(lead + k, len(arr) - 1)].astype(np.int64) for k in (1, 2)]
            code = (arr[lead].astype(np.int64) << 16) | (nxt[0] << 8) | nxt[1]
            for n, codes in _SPACE_CODES.items():
                hit = lead[np.isin(code >> (8 * (3 - n)), codes)]
                for k in range(n):
                    inner[hit + k] = False
    return word


_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


def _low_bytes(n: np.ndarray) -> np.ndarray:
    """uint64 masks of the low min(n, 8) bytes."""
    return _LOW_BYTES[np.minimum(n, 8)]


def _hash_words(padded: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """uint64 hash of every word `padded[start:end]` (`padded` ends in 8 zero bytes), vectorized:
    the word's first 8 bytes read as one little-endian integer, each further 8 bytes mixed in with
    MurmurHash3's finalizer, then its length and the finalizer again; words over `LONG_WORD`
    bytes (rare) get xxh3_64. Equal words hash equal wherever they stand."""
    view = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))  # 8 bytes at each offset
    lens = ends - starts
    h = view[starts] & _low_bytes(lens)
    sel = np.flatnonzero(lens > 8)
    for k in range(1, LONG_WORD // 8):
        if k > 1:
            sel = sel[lens[sel] > 8 * k]  # the longer words, fewer every round
        if not len(sel):
            break
        h[sel] = fmix64(h[sel], copy=False) ^ (view[starts[sel] + 8 * k] & _low_bytes(lens[sel] - 8 * k))
    h ^= lens.astype(np.uint64) * BAND_MULT
    h = fmix64(h, copy=False)
    for i in np.flatnonzero(lens > LONG_WORD).tolist():
        h[i] = xxhash.xxh3_64_intdigest(padded[starts[i]:ends[i]])
    return h


def word_hashes(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, start offset) of every ASCII-whitespace-separated word of `buf` (the words of
    `buf.split()`), without a Python call per word (`_hash_words`)."""
    padded = buf + bytes(8)
    starts, ends = _runs(_word_mask(np.frombuffer(padded, dtype=np.uint8)[:len(buf)], like_str=False))
    return _hash_words(padded, starts, ends), starts


def _exact_digests(buf: bytes, lens: list[int], collapse: bool,
                   words: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[bytes]:
    """xxh3-128 digests of the texts joined by newlines in `buf` (UTF-8, `lens` bytes each), with
    `collapse` of the text as `" ".join(text.split())` gives it: word runs found with numpy (or
    `words`, `_word_mask` and `_runs` of `buf` like `str.split`), the first byte of every gap
    between two words of a text made a space, the other space bytes dropped (by one
    `bytes.translate`), one xxh3 call per text."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lens, dtype=np.int64) + 1)])
    if not collapse:
        view = memoryview(buf)
        return [xxhash.xxh3_128_digest(view[o:o + n]) for o, n in zip(offsets.tolist(), lens)]
    arr = np.frombuffer(buf, dtype=np.uint8)
    if words is None:
        word = _word_mask(arr, like_str=True, ascii=buf.isascii())
        words = (word, *_runs(word))
    word, starts, ends = words
    if not len(starts):
        return [xxhash.xxh3_128_digest(b"")] * len(lens)
    first = np.searchsorted(starts, offsets)  # the first word of each text; len(starts) at the end
    later = np.ones(len(starts) + 1, dtype=bool)
    later[first] = False  # a word that is not the first of its text
    gap = ends[:-1][later[1:-1]]  # the first space byte between two words of a text
    text = word[1:-1].view(np.uint8) - np.uint8(1)  # 0 on words, 0xFF elsewhere
    text |= arr  # the words' bytes, 0xFF (never in UTF-8) on the spaces
    text[gap] = 32  # one space between two words of a text
    view = memoryview(text.tobytes().translate(None, b"\xff"))
    chars = np.concatenate([[0], np.cumsum(ends - starts)])
    size = (chars[first[1:]] - chars[first[:-1]] + np.maximum(np.diff(first) - 1, 0)).tolist()
    bounds = np.concatenate([[0], np.cumsum(size)]).tolist()
    return [xxhash.xxh3_128_digest(view[o:o + n]) for o, n in zip(bounds, size)]


class DocumentHashes(NamedTuple):
    exact: np.ndarray
    """(docs, 2) uint64: the 128-bit exact-duplicate keys (`exact_key`)."""
    shingles: np.ndarray
    """uint64 hashes of the lowercased word n-grams of all documents, one after the other."""
    offsets: np.ndarray
    """(docs + 1) int64: document i's shingles are `shingles[offsets[i]:offsets[i + 1]]`."""


def document_hashes(texts: Sequence[str], ngram: int, near: bool = True, normalize_whitespace: bool = True,
                    lowercase: bool = False, exact: bool = True) -> DocumentHashes:
    """Exact keys and (with `near`) shingle hashes of a shard's texts, in batches of about
    `BATCH_BYTES`: each text is encoded once, a batch is lowercased as one bytes object (Python's
    `str.lower` only for a non-ASCII text), and words are found and hashed for the whole batch by
    numpy; n-grams never cross two texts. Exact keys equal `exact_key` text by text (tests); without
    `exact` they are left zero."""
    keys: list[bytes] = []
    hashes: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    i = 0
    while i < len(texts):
        batch: list[str] = []
        raw: list[bytes] = []
        size = 0
        while i < len(texts) and (not batch or size < BATCH_BYTES):
            batch.append(texts[i])
            raw.append(texts[i].encode("utf-8"))
            size += len(raw[-1]) + 1
            i += 1
        buf, lens = b"\n".join(raw), [len(r) for r in raw]
        low, low_lens = buf, lens
        if buf.isascii():
            low = buf.lower() if near or lowercase else buf
        elif near or lowercase:  # str.lower for the non-ASCII texts only; bytes.lower does ASCII letters
            low_raw = [r if r.isascii() else t.lower().encode("utf-8") for r, t in zip(raw, batch)]
            low, low_lens = b"\n".join(low_raw).lower(), [len(r) for r in low_raw]
        words = None
        if near:
            padded = low + bytes(8)
            arr = np.frombuffer(padded, dtype=np.uint8)[:len(low)]
            mask = _word_mask(arr, like_str=False)
            starts, ends = _runs(mask)
            doc_starts = np.concatenate([[0], np.cumsum(np.asarray(low_lens, dtype=np.int64) + 1)])
            h, c = _shingles(_hash_words(padded, starts, ends),
                             np.diff(np.searchsorted(starts, doc_starts)), ngram)
            hashes.append(h)
            counts.append(c)
            if buf.isascii() and not ((arr - np.uint8(28)) <= 3).any():
                words = (mask, starts, ends)  # the same words where str.split and bytes.split agree
        if exact:
            keys += _exact_digests(low if lowercase else buf, low_lens if lowercase else lens,
                                   normalize_whitespace, words)
    keys_all = np.frombuffer(b"".join(keys), dtype=np.uint64).reshape(-1, 2) if exact else \
        np.zeros((len(texts), 2), dtype=np.uint64)
    counts_all = np.concatenate(counts) if counts else np.zeros(len(texts), dtype=np.int64)
    return DocumentHashes(keys_all, np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64),
                          np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64))


def ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """uint64 key of every n-gram (positions 0..len-n) of uint64 word ids or hashes, multiply-xor."""
    m = len(ids) - n + 1
    h = ids[:m].copy()
    for k in range(1, n):
        h *= SHINGLE_MULT
        h ^= ids[k:k + m]
    return h


def _shingles(w: np.ndarray, words: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, count per text) of the n-grams of consecutive word hashes `w`, texts having
    `words` words each: five word hashes combined by multiply-xor, n-grams across texts dropped."""
    counts = np.maximum(words - ngram + 1, 0)
    m = len(w) - ngram + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64), counts
    h = ngram_keys(w, ngram)
    doc = np.repeat(np.arange(len(words)), words)
    return h[doc[:m] == doc[ngram - 1:]], counts


def shingle_hashes_batch(texts: Sequence[str], ngram: int) -> list[np.ndarray]:
    """uint64 hashes of the lowercased word n-grams of each text (empty when fewer words than n)."""
    d = document_hashes(texts, ngram, exact=False)
    return np.split(d.shingles, d.offsets[1:-1])


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


def fmix64(h: np.ndarray, copy: bool = True) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit affects every output bit (in place on `h`
    without `copy`; one temporary array instead of one per step)."""
    h = h.copy() if copy else h
    t = h >> np.uint64(33)
    h ^= t
    h *= np.uint64(0xFF51AFD7ED558CCD)
    np.right_shift(h, np.uint64(33), out=t)
    h ^= t
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    np.right_shift(h, np.uint64(33), out=t)
    h ^= t
    return h


def probe_table(num_perm: int, seed: int, probes: int = 256) -> np.ndarray:
    """(num_perm, probes) bins an empty bin borrows from, in order: the same for every document."""
    rng = np.random.Generator(np.random.PCG64(seed + 7919))
    return rng.integers(0, num_perm, size=(num_perm, probes))


def oph_signatures(shingles: Sequence[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    """`oph_flat` of per-document shingle hash arrays."""
    lengths = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=len(shingles))
    flat = np.concatenate(shingles) if len(shingles) else np.zeros(0, dtype=np.uint64)
    return oph_flat(flat, np.concatenate([[0], np.cumsum(lengths)]), num_perm, seed)


def oph_flat(shingles: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(docs, num_perm) uint32 signatures by one permutation hashing (Li, Owen & Zhang 2012) with
    optimal densification (Shrivastava 2017): one hash per shingle picks a bin (high bits) and a
    value (low bits), a bin keeps its minimum, and an empty bin borrows the value of the first
    non-empty bin of its fixed probe sequence. The collision probability of a position is the
    Jaccard similarity, as with `num_perm` independent permutations, for 1/num_perm of the work.
    Document i's shingles are `shingles[offsets[i]:offsets[i + 1]]`; all documents at once."""
    d = len(offsets) - 1
    out = np.full((d, num_perm), EMPTY, dtype=np.uint32)
    lengths = np.diff(offsets)
    if d == 0 or len(shingles) == 0:
        return out
    salt = np.uint64(xxhash.xxh64_intdigest(str(seed).encode()))
    row = np.repeat(np.arange(0, d * num_perm, num_perm, dtype=np.int64), lengths)
    for lo in range(0, len(shingles), OPH_CHUNK):  # arrays that stay in the CPU's cache
        h = fmix64(shingles[lo:lo + OPH_CHUNK] ^ salt, copy=False)
        value = h.astype(np.uint32)  # the low 32 bits
        h >>= np.uint64(32)
        h *= np.uint64(num_perm)
        h >>= np.uint64(32)  # the bin, < num_perm, from the high 32 bits
        cell = h.view(np.int64)
        cell += row[lo:lo + OPH_CHUNK]
        np.minimum.at(out.reshape(-1), cell, value)
    rows, bins = np.nonzero((out == EMPTY) & (lengths > 0)[:, None])
    if not len(rows):
        return out
    fill = np.empty(len(rows), dtype=np.uint32)
    todo = np.arange(len(rows))
    for column in probe_table(num_perm, seed).T:  # only the empty bins, fewer every probe
        borrowed = out[rows[todo], column[bins[todo]]]
        found = borrowed != EMPTY
        fill[todo[found]] = borrowed[found]
        todo = todo[~found]
        if not len(todo):
            break
    for t in todo.tolist():  # probes exhausted (a handful of shingles): the next non-empty bin right
        nz = np.flatnonzero(out[rows[t]] != EMPTY)
        fill[t] = out[rows[t], nz[np.searchsorted(nz, bins[t]) % len(nz)]]
    out[rows, bins] = fill
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
