"""Tokenize stage: round trips, packing, byte accounting, determinism, reuse and rebuild."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import TokenizerConfig
from tasks.stage import MANIFEST, StageResult
from tasks.tokenize import (EOS, _binary_column, _rows_from_binary, is_val, load_tokenizer, pack_rows,
                            read_rows, run_tokenize, token_byte_lengths, token_dtype, train_tokenizer)

SPECIAL = [
    "def add(a, b):\n\treturn a + b\n\n\nclass Foo:\n\tpass\n",
    "Grüße aus Köln, naïve café; 中文字符和标点。 русский текст — «кавычки».",
    "emoji 🎉🚀👍🏽 and a family 👨‍👩‍👧 (ZWJ), flags 🇩🇪🇯🇵, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "windows\r\nline endings\r\n\ttab after CRLF\r\n",
    "a literal <|endoftext|> inside a document is text, not a separator",
    "",
    "   leading and trailing whitespace \t \n",
    "\x00\x01 control characters \x7f and a lone combining accent e\u0301",
]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_docs() -> list[tuple[str, str]]:
    docs = [(f"special-{i}", t) for i, t in enumerate(SPECIAL)]
    for i in range(56):
        words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(20 + i % 13))
        docs.append((f"doc-{i:03d}", f"def f{i}(x):\n\t# {words}\n\treturn x * {i} + {i % 5}\n"
                                     f"print(f{i}(3))  # → {i}€\n"))
    return docs


DOCS = make_docs()


def write_corpus(directory, docs=DOCS, files=2):
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for k in range(files):
        part = docs[k * per:(k + 1) * per]
        table = pa.table({"id": [d for d, _ in part], "text": [t for _, t in part],
                          "source": ["test"] * len(part)})
        pq.write_table(table, directory / f"docs-{k:05d}.parquet", compression="zstd")
    return StageResult(stage="dedup", fingerprint="dedup-fp", path=str(directory))


def cfg(**kw):
    base = dict(vocab_size=360, seq_len=16, val_fraction=0.25, train_sample_bytes=1_000_000,
                rows_per_file=7)
    return TokenizerConfig(**{**base, **kw})


@pytest.fixture
def upstream(tmp_path):
    return write_corpus(tmp_path / "dedup")


@pytest.fixture
def built(tmp_path, upstream):
    c = cfg()
    return c, run_tokenize(c, upstream, str(tmp_path / "ws"))


def manifest_of(result):
    return json.loads((Path(result.path) / MANIFEST).read_text())


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted (written out independently of the code under test)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def ref_is_val(doc_id, val_fraction):
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def split_docs(val_fraction):
    """The split's texts in corpus order, by the documented rule."""
    return {"train": [t for d, t in DOCS if not ref_is_val(d, val_fraction)],
            "val": [t for d, t in DOCS if ref_is_val(d, val_fraction)]}


def test_every_document_round_trips(built):
    _, result = built
    tok = load_tokenizer(result.path)
    lengths = token_byte_lengths(tok)
    for _, text in DOCS:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode("utf-8"))
        assert result.info["eos_id"] not in ids  # the literal "<|endoftext|>" stays text
    assert tok.token_to_id(EOS) == result.info["eos_id"]
    assert lengths[result.info["eos_id"]] == 0


def test_rows_reconstruct_the_token_stream(built):
    c, result = built
    tok, eos, L = load_tokenizer(result.path), result.info["eos_id"], c.seq_len
    manifest = manifest_of(result)
    for split, texts in split_docs(c.val_fraction).items():
        stream = [eos] + [i for t in texts for i in tok.encode(t).ids + [eos]]
        rows, _ = read_rows(result.path, split)
        n = (len(stream) - 1) // L
        assert rows.shape == (n, L + 1) and n > 0
        for k in range(n):
            assert rows[k].tolist() == stream[k * L:k * L + L + 1]
        assert manifest["tail_tokens_dropped"][split] == len(stream) - 1 - n * L
        assert result.counts[f"{split}_tokens"] == len(stream) - 1
        assert result.counts[f"{split}_rows"] == n


def test_n_bytes_cover_exactly_the_split_text(built):
    c, result = built
    decoder = gpt2_byte_decoder()
    tok = load_tokenizer(result.path)
    vocab = {i: t for t, i in tok.get_vocab().items()}
    manifest = manifest_of(result)
    for split, texts in split_docs(c.val_fraction).items():
        rows, n_bytes = read_rows(result.path, split)
        text = b"".join(t.encode("utf-8") for t in texts)
        covered = []
        for row, nb in zip(rows, n_bytes):
            got = b"".join(b"" if i == result.info["eos_id"] else bytes(decoder[ch] for ch in vocab[int(i)])
                           for i in row[1:])
            assert len(got) == nb
            covered.append(got)
        covered = b"".join(covered)
        assert text.startswith(covered)  # targets walk through the text in order, each byte once
        assert int(n_bytes.sum()) + manifest["tail_bytes_dropped"][split] == len(text)
        assert result.info[f"{split}_bytes"] == len(text)


def test_split_is_by_document_id_and_counts_add_up(built):
    c, result = built
    ref = split_docs(c.val_fraction)
    assert all(is_val(d, c.val_fraction) == ref_is_val(d, c.val_fraction) for d, _ in DOCS)
    assert result.counts["train_docs"] == len(ref["train"]) and result.counts["val_docs"] == len(ref["val"])
    assert result.counts["docs_in"] == len(DOCS) and 0 < len(ref["val"]) < len(DOCS)


def test_same_input_same_output_and_thread_count_does_not_matter(tmp_path, upstream, built, monkeypatch):
    _, first = built
    again = run_tokenize(cfg(), upstream, str(tmp_path / "ws2"))
    assert again.fingerprint == first.fingerprint and not again.reused
    assert again.info["tokenizer_sha256"] == first.info["tokenizer_sha256"]
    files = [{f["path"]: f["sha256"] for f in manifest_of(r)["files"]} for r in (first, again)]
    assert files[0] == files[1]

    texts = [t for _, t in DOCS] * 4
    serialized = []
    for setting in ("false", "true"):  # one thread vs the rayon pool
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
        serialized.append(train_tokenizer(iter(texts), 400).to_str())
    assert serialized[0] == serialized[1]


def test_empty_val_split_names_the_keys(tmp_path, upstream):
    fraction = 1e-6
    assert not any(is_val(d, fraction) for d, _ in DOCS)
    with pytest.raises(ValueError, match=r"tokenizer\.val_fraction.*tokenizer\.seq_len|"
                                         r"tokenizer\.seq_len.*tokenizer\.val_fraction") as err:
        run_tokenize(cfg(val_fraction=fraction), upstream, str(tmp_path / "ws"))
    assert "val split" in str(err.value) and "0 of 64 documents" in str(err.value)
    with pytest.raises(ValueError, match=r"tokenizer\.seq_len=100000"):
        run_tokenize(cfg(seq_len=100_000), upstream, str(tmp_path / "ws"))


def test_rerun_reuses_without_rewriting(tmp_path, upstream, built):
    _, first = built
    stats = {p: p.stat().st_mtime_ns for p in sorted(Path(first.path).rglob("*"))}
    again = run_tokenize(cfg(), upstream, str(tmp_path / "ws"))
    assert again.reused and again.path == first.path
    assert again.counts == first.counts and again.info == first.info
    assert {p: p.stat().st_mtime_ns for p in stats} == stats
    assert sorted(Path(first.path).rglob("*")) == sorted(stats)


def test_partial_directory_is_rebuilt(tmp_path, upstream, built):
    _, first = built
    out = Path(first.path)
    part = out / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])  # a crash mid-write: manifest sizes no longer match
    (out / "stray.tmp").write_text("leftover")
    again = run_tokenize(cfg(), upstream, str(tmp_path / "ws"))
    assert not again.reused and again.counts == first.counts
    assert not (out / "stray.tmp").exists()
    assert read_rows(out, "train")[0].shape[0] == first.counts["train_rows"]

    (out / MANIFEST).unlink()
    assert not run_tokenize(cfg(), upstream, str(tmp_path / "ws")).reused


def test_read_rows_shape_dtype_and_files(built):
    c, result = built
    assert result.info["dtype"] == "uint16" and result.info["seq_len"] == c.seq_len
    assert result.info["vocab_size"] == c.vocab_size
    for split in ("train", "val"):
        rows, n_bytes = read_rows(result.path, split)
        assert rows.dtype == np.uint16 and rows.shape == (result.counts[f"{split}_rows"], c.seq_len + 1)
        assert n_bytes.dtype == np.int64 and n_bytes.shape == (rows.shape[0],)
        assert rows.max() < result.info["vocab_size"]
        parts = sorted((Path(result.path) / split).glob("part-*.parquet"))
        assert len(parts) == -(-rows.shape[0] // c.rows_per_file)
        table = pq.read_table(parts[0])
        assert table.schema.field("tokens").type == pa.binary()
        assert table.schema.field("n_bytes").type == pa.int32()
        assert table.num_rows == min(c.rows_per_file, rows.shape[0])
    with pytest.raises(ValueError):
        read_rows(result.path, "test")


def test_small_training_sample_limits_the_vocabulary(tmp_path, upstream):
    result = run_tokenize(cfg(train_sample_bytes=40), upstream, str(tmp_path / "ws"))
    assert result.info["vocab_size"] <= 257 + 40  # at most one merge per sampled byte
    assert result.counts["train_rows"] > 0


def test_packing_and_wide_ids_round_trip():
    stream = np.arange(50, dtype=np.uint32) + 70_000
    rows, rest = pack_rows(stream, 8)
    assert rows.shape == (6, 9) and rows[1, 0] == rows[0, -1] and rest.tolist() == stream[48:].tolist()
    assert pack_rows(stream[:5], 8)[0].shape == (0, 9)
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    column = _binary_column(rows.astype(token_dtype(70_100)))
    back = _rows_from_binary(column.slice(2), np.dtype("<u4"), 9)
    assert back.tolist() == rows[2:].tolist()
