"""MinHash signatures: Jaccard estimates near the truth, chunked = unchunked, bands agree."""
import random

import numpy as np

import tasks.dedup.minhash as mh
from planted_corpus import base_doc, edit, jaccard, vocabulary


def test_estimate_tracks_true_jaccard():
    rng = random.Random(0)
    vocab = vocabulary(rng)
    a, b = mh.hash_params(112, seed=1)
    errors = []
    for k in (1, 3, 10, 30, 80):
        x = base_doc(rng, vocab, 300)
        y = edit(rng, vocab, x, k)
        sig = mh.signatures([mh.shingle_hashes(x, 5), mh.shingle_hashes(y, 5)], a, b)
        errors.append(abs(mh.estimated_jaccard(sig[0], sig[1]) - jaccard(x, y)))
    assert max(errors) < 0.15 and np.mean(errors) < 0.07  # sd of a 112-hash estimate <= 0.047


def test_signatures_do_not_depend_on_batching(monkeypatch):
    rng = random.Random(1)
    vocab = vocabulary(rng)
    docs = [base_doc(rng, vocab, n) for n in (3, 50, 400, 2000)]
    a, b = mh.hash_params(16, seed=2)
    shingles = [mh.shingle_hashes(d, 5) for d in docs]
    assert len(shingles[0]) == 0
    whole = mh.signatures(shingles, a, b)
    monkeypatch.setattr(mh, "CHUNK", 64)  # forces multi-batch and chunked large documents
    assert np.array_equal(mh.signatures(shingles, a, b), whole)
    assert (whole[0] == mh.EMPTY).all() and (whole[1:] != mh.EMPTY).all()
    keys = mh.band_keys(np.vstack([whole[2], whole[2], whole[3]]), bands=4, rows=4)
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).any()


def test_shingles_are_case_insensitive_and_deterministic():
    assert np.array_equal(mh.shingle_hashes("A b C d E f", 5), mh.shingle_hashes("a B c D e F", 5))
    assert len(mh.shingle_hashes("a b c d e f", 5)) == 2
    assert np.array_equal(mh.hash_params(8, 3)[0], mh.hash_params(8, 3)[0])


def test_one_permutation_hashing_estimates_like_minhash():
    rng = random.Random(4)
    vocab = vocabulary(rng)
    errors = []
    for words in (60, 300, 1500):
        for k in (1, 5, 20):
            x = base_doc(rng, vocab, words)
            y = edit(rng, vocab, x, min(k, words // 4))
            sig = mh.oph_signatures(mh.shingle_hashes_batch([x, y, ""], 5), 112, seed=1)
            assert (sig[2] == mh.EMPTY).all() and (sig[:2] != mh.EMPTY).all()  # densified
            errors.append(mh.estimated_jaccard(sig[0], sig[1]) - jaccard(x, y))
    assert abs(np.mean(errors)) < 0.04 and max(map(abs, errors)) < 0.16


def test_vectorized_word_hashes_split_like_bytes_split(monkeypatch):
    rng = random.Random(7)
    alphabet = [b"a", b"b", b"\xc3\xa9", b"\x00", b"\x1c", b"\xa0", b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c"]
    buf = b"".join(rng.choice(alphabet) for _ in range(20_000))
    words = buf.split()
    hashes, starts = mh.word_hashes(buf)
    assert len(hashes) == len(words) and all(buf[s:s + len(w)] == w for s, w in zip(starts, words))
    by_word: dict[bytes, set[int]] = {}
    for w, h in zip(words, hashes.tolist()):
        by_word.setdefault(w, set()).add(h)
    assert all(len(v) == 1 for v in by_word.values())  # a word always hashes the same
    assert len(set().union(*by_word.values())) == len(by_word)  # distinct words, distinct hashes
    assert np.array_equal(mh.word_hashes(b"x y")[0][1:], mh.word_hashes(b"y")[0])
    monkeypatch.setattr(mh, "BATCH_BYTES", 50)  # prefix sums over many short runs of words
    small_runs = mh.word_hashes(buf)
    assert np.array_equal(small_runs[0], hashes) and np.array_equal(small_runs[1], starts)


def test_batch_exact_keys_equal_exact_key_text_by_text(monkeypatch):
    rng = random.Random(9)
    pieces = ["a", "B", "\u00e9", "\u03a9", "\u212a", "\u0130", " ", "  ", "\t", "\r\n", "\x1c", "\x1f", "\u00a0",
              "\u2003", "\u3000", "\x85", "\x00", "Long" * 12]
    mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    # ASCII without \x1c-\x1f: exact keys reuse the word runs found for the shingles
    ascii_only = [t.encode("ascii", "ignore").decode().replace("\x1c", "").replace("\x1f", "") for t in mixed]
    edge = ["", "   ", "one", "two  spaces\tand tabs\n", "\x1cseparated\x1dwords"]
    for texts in (mixed + edge, ascii_only, ascii_only + mixed + edge):
        for normalize_whitespace in (True, False):
            for lowercase in (True, False):
                want = [mh.exact_key(t, normalize_whitespace, lowercase) for t in texts]
                for near in (True, False):
                    got = mh.document_hashes(texts, 5, near, normalize_whitespace, lowercase).exact
                    assert [row.tobytes() for row in got] == want
        monkeypatch.setattr(mh, "BATCH_BYTES", 64)  # many small batches: the same keys
        assert [row.tobytes() for row in mh.document_hashes(texts, 5).exact] == [
            mh.exact_key(t, True, False) for t in texts]
        monkeypatch.undo()
    # every character str.split() splits on beyond ASCII is one of the byte sequences looked for
    assert all(not chr(c).isspace() for c in range(0x10000, 0x110000))


def test_batch_shingles_follow_bytes_split_of_the_lowercased_text():
    rng = random.Random(11)
    vocab = vocabulary(rng) + ["\u00c9cole", "STRASSE", "x" * 70, "y" * 200, "\u212aelvin"]  # 200: xxh3
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    d = mh.document_hashes(texts, 5)
    assert np.diff(d.offsets).tolist() == [max(len(t.lower().encode().split()) - 4, 0) for t in texts]
    per_text = mh.shingle_hashes_batch(texts, 5)
    assert all(np.array_equal(d.shingles[d.offsets[i]:d.offsets[i + 1]], s) for i, s in enumerate(per_text))
    seen: dict[bytes, int] = {}  # the same 5 words, the same hash, in any text; others differ
    for t, hashes in zip(texts, per_text):
        w = t.lower().encode().split()
        for j, h in enumerate(hashes.tolist()):
            assert seen.setdefault(b" ".join(w[j:j + 5]), h) == h
    assert len(set(seen.values())) == len(seen)
    assert np.array_equal(mh.oph_flat(d.shingles, d.offsets, 112, 1), mh.oph_signatures(per_text, 112, 1))
