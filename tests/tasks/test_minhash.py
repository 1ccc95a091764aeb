"""MinHash signatures: Jaccard estimates near the truth, chunked = unchunked, bands agree."""
import random

import numpy as np

import tasks.minhash as mh
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
