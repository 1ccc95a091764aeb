"""Tokenize stage: round trips, packing, byte accounting, split, mixture, metadata, side table,
loaded GPT-2 tokenizers, reuse and per-unit resume."""
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.data_config import TokenizerConfig
from tasks.core.protocol import MANIFEST, StageResult
from tasks.tokenize.bpe import EOS, load_tokenizer, token_byte_lengths, token_dtype, train_tokenizer
from tasks.tokenize.packing import _binary_column, is_val, pack_rows
from tasks.tokenize.rows import INDEX_DIR, _rows_from_binary, read_rows, rows_of_documents, split_parts
from tasks.tokenize.stage import plan, run_tokenize

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


FILES = 2
PER_FILE = -(-len(DOCS) // FILES)


def write_corpus(directory, docs=DOCS, files=FILES, sources=None):
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for k in range(files):
        part = docs[k * per:(k + 1) * per]
        labels = sources[k * per:(k + 1) * per] if sources else ["test"] * len(part)
        table = pa.table({"id": [d for d, _ in part], "text": [t for _, t in part], "source": labels})
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


def sha256s(result):
    return [f["sha256"] for f in manifest_of(result)["files"]]


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


def ref_is_val(doc_id, val_fraction, seed=0):
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def split_docs(val_fraction, unit=None):
    """The split's texts in corpus order (of one input file, when `unit` is given), by the rule."""
    docs = DOCS if unit is None else DOCS[unit * PER_FILE:(unit + 1) * PER_FILE]
    return {"train": [t for d, t in docs if not ref_is_val(d, val_fraction)],
            "val": [t for d, t in docs if ref_is_val(d, val_fraction)]}


def unit_rows(result, split, unit):
    """The rows of one input file's stream, read straight from its part files."""
    out = Path(result.path)
    parts = sorted((out / split).glob(f"part-{unit:05d}-*.parquet"))
    width = result.info["seq_len"] + 1
    return np.concatenate([_rows_from_binary(c, np.dtype("<u2"), width)
                           for p in parts for c in pq.read_table(p).column("tokens").chunks])


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


def test_documents_decode_back_from_the_stored_rows(built):
    c, result = built
    tok, eos = load_tokenizer(result.path), result.info["eos_id"]
    for split in ("train", "val"):
        for unit in range(FILES):
            rows = unit_rows(result, split, unit)
            stream = [int(rows[0, 0])] + rows[:, 1:].reshape(-1).tolist()
            assert stream[0] == eos
            pieces = np.split(np.array(stream[1:]), np.flatnonzero(np.array(stream[1:]) == eos) + 1)
            complete = [p[:-1].tolist() for p in pieces if len(p) and p[-1] == eos]
            texts = split_docs(c.val_fraction, unit)[split]
            assert [tok.decode(ids) for ids in complete] == texts[:len(complete)]
            assert len(complete) >= len(texts) - 1 - c.seq_len  # only the dropped tail is missing


def test_rows_reconstruct_the_token_stream(built):
    c, result = built
    tok, eos, L = load_tokenizer(result.path), result.info["eos_id"], c.seq_len
    manifest = manifest_of(result)
    for split in ("train", "val"):
        tails, tokens, total_rows = 0, 0, 0
        for unit in range(FILES):
            texts = split_docs(c.val_fraction, unit)[split]
            stream = [eos] + [i for t in texts for i in tok.encode(t).ids + [eos]]
            rows = unit_rows(result, split, unit)
            n = (len(stream) - 1) // L
            assert rows.shape == (n, L + 1) and n > 0
            for k in range(n):
                assert rows[k].tolist() == stream[k * L:k * L + L + 1]
            tails += len(stream) - 1 - n * L
            tokens += len(stream) - 1
            total_rows += n
        assert manifest["tail_tokens_dropped"][split] == tails
        assert result.counts[f"{split}_tokens"] == tokens
        assert result.counts[f"{split}_rows"] == total_rows == read_rows(result.path, split)[0].shape[0]


def test_n_bytes_cover_exactly_the_split_text(built):
    c, result = built
    decoder = gpt2_byte_decoder()
    tok = load_tokenizer(result.path)
    vocab = {i: t for t, i in tok.get_vocab().items()}
    manifest = manifest_of(result)
    for split in ("train", "val"):
        total = 0
        for unit in range(FILES):
            texts = split_docs(c.val_fraction, unit)[split]
            rows = unit_rows(result, split, unit)
            text = b"".join(t.encode("utf-8") for t in texts)
            covered = b"".join(b"".join(b"" if i == result.info["eos_id"] else
                                        bytes(decoder[ch] for ch in vocab[int(i)]) for i in row[1:])
                               for row in rows)
            assert text.startswith(covered)  # targets walk through the text in order, each byte once
            total += len(text)
        _, n_bytes = read_rows(result.path, split)
        assert int(n_bytes.sum()) + manifest["tail_bytes_dropped"][split] == total
        assert result.info[f"{split}_bytes"] == total


def test_split_is_by_document_id_and_seed_without_leakage(tmp_path, upstream, built):
    c, result = built
    ref = split_docs(c.val_fraction)
    assert all(is_val(d, c.val_fraction) == ref_is_val(d, c.val_fraction) for d, _ in DOCS)
    assert result.counts["train_docs"] == len(ref["train"]) and result.counts["val_docs"] == len(ref["val"])
    assert result.counts["docs_in"] == len(DOCS) and 0 < len(ref["val"]) < len(DOCS)
    ids = {s: set(pq.read_table(Path(result.path) / INDEX_DIR / s).column("doc_id").to_pylist())
           for s in ("train", "val")}
    assert not ids["train"] & ids["val"]
    assert ids["val"] <= {d for d, _ in DOCS if ref_is_val(d, c.val_fraction)}
    assert ids["train"] <= {d for d, _ in DOCS if not ref_is_val(d, c.val_fraction)}

    other = run_tokenize(cfg(split_seed=7), upstream, str(tmp_path / "ws"))
    assert other.fingerprint != result.fingerprint
    assert other.counts["val_docs"] == sum(ref_is_val(d, c.val_fraction, 7) for d, _ in DOCS)
    assert {d for d, _ in DOCS if ref_is_val(d, c.val_fraction, 7)} != \
        {d for d, _ in DOCS if ref_is_val(d, c.val_fraction)}


def test_parquet_metadata_encoding_and_row_groups(tmp_path, upstream):
    c = cfg(rows_per_file=40, row_group_tokens=1024)  # 1024 // 17 = 60 rows > 40: one group per file
    result = run_tokenize(c, upstream, str(tmp_path / "ws"))
    for part in split_parts(result.path, "train"):
        f = pq.ParquetFile(Path(result.path) / part["path"])
        meta = f.schema_arrow.metadata
        assert meta[b"neo.schema"] == b"neo-tokens/1" and meta[b"neo.split"] == b"train"
        assert int(meta[b"neo.vocab_size"]) == result.info["vocab_size"]
        assert int(meta[b"neo.eos_id"]) == result.info["eos_id"]
        assert int(meta[b"neo.seq_len"]) == c.seq_len and meta[b"neo.dtype"] == b"uint16"
        assert meta[b"neo.tokenizer_sha256"].decode() == result.info["tokenizer_sha256"]
        for g in range(f.metadata.num_row_groups):
            chunk = f.metadata.row_group(g).column(0)
            assert chunk.path_in_schema == "tokens" and chunk.compression == "ZSTD"
            assert not any("DICTIONARY" in e for e in chunk.encodings), chunk.encodings
    manifest = manifest_of(result)
    assert manifest["schema"] == "neo-tokens/1" and manifest["seq_len"] == c.seq_len
    assert "trained" in manifest["tokenizer_name"]
    assert manifest["sources"]["train"]["test"]["tokens"] == result.counts["train_tokens"]


def test_row_groups_hold_the_configured_tokens(tmp_path, upstream):
    result = run_tokenize(cfg(rows_per_file=100, row_group_tokens=1024), upstream, str(tmp_path / "ws"))
    part = split_parts(result.path, "train")[0]
    f = pq.ParquetFile(Path(result.path) / part["path"])
    sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    assert sizes[0] == 1024 // 17 and sum(sizes) == part["rows"] and len(sizes) > 1


def test_side_table_traces_every_row_to_its_documents(built):
    c, result = built
    out = Path(result.path)
    texts = dict(DOCS)
    for split in ("train", "val"):
        rows, n_bytes = read_rows(out, split)
        first = 0
        for part in split_parts(out, split):
            index = pq.read_table(out / INDEX_DIR / part["path"]).to_pylist()
            assert {r["row"] for r in index} == set(range(part["rows"]))
            for k in range(part["rows"]):
                segs = [r for r in index if r["row"] == k]
                got = b"".join(texts[r["doc_id"]].encode()[r["byte_start"]:r["byte_end"]] for r in segs)
                assert len(got) == n_bytes[first + k]
            first += part["rows"]
        # every document of the split is covered, from byte 0, in consecutive ranges
        index = pq.read_table(out / INDEX_DIR / split).to_pylist()
        by_doc = {}
        for r in index:
            by_doc.setdefault(r["doc_id"], []).append((r["byte_start"], r["byte_end"]))
        for doc_id, ranges in by_doc.items():
            assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert ranges[-1][1] <= len(texts[doc_id].encode())
    doc = next(d for d, _ in DOCS if not ref_is_val(d, c.val_fraction) and len(dict(DOCS)[d]) > 100)
    hit = rows_of_documents(out, "train", [doc])
    assert len(hit) >= 1
    tok, train = load_tokenizer(out), read_rows(out, "train")[0]
    assert (np.diff(hit) == 1).all()  # a document's rows are consecutive
    ids = np.concatenate([train[hit[0]], train[hit[1:], 1:].reshape(-1)])  # rows overlap by one token
    assert texts[doc] in tok.decode(ids.tolist())


def test_mixture_weights_draw_sources_by_epochs(tmp_path):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do".split()
    docs, sources = [], []
    for i in range(400):
        label = "code" if i % 2 else "prose"
        docs.append((f"{label}-{i}", " ".join(words[(i + j) % len(words)] for j in range(8 + i % 5))))
        sources.append(label)
    up = write_corpus(tmp_path / "dedup", docs, files=2, sources=sources)
    base = run_tokenize(cfg(seq_len=8, val_fraction=0.1), up, str(tmp_path / "ws"))
    mixed = run_tokenize(cfg(seq_len=8, val_fraction=0.1, mixture={"code": 2.0, "prose": 0.5}), up,
                         str(tmp_path / "ws"))
    b, m = base.info["sources"], mixed.info["sources"]
    assert m["val"] == b["val"]  # validation is never reweighted
    assert m["train"]["code"]["docs"] == 2 * b["train"]["code"]["docs"]
    assert m["train"]["code"]["tokens"] == 2 * b["train"]["code"]["tokens"]
    n, p = b["train"]["prose"]["docs"], 0.5
    assert abs(m["train"]["prose"]["docs"] - n * p) <= 4 * (n * p * (1 - p)) ** 0.5  # 4 sigma
    code, prose = b["train"]["code"]["tokens"], b["train"]["prose"]["tokens"]
    want = 2 * code / (2 * code + 0.5 * prose)
    got = m["train"]["code"]["tokens"] / (m["train"]["code"]["tokens"] + m["train"]["prose"]["tokens"])
    assert abs(got - want) < 0.05
    assert mixed.counts["train_docs_unused"] == n - m["train"]["prose"]["docs"]
    assert mixed.counts["train_draws"] == m["train"]["code"]["docs"] + m["train"]["prose"]["docs"]
    assert sum(a["tokens"] for a in m["train"].values()) == mixed.counts["train_tokens"]
    again = run_tokenize(cfg(seq_len=8, val_fraction=0.1, mixture={"code": 2.0, "prose": 0.5}), up,
                         str(tmp_path / "ws2"))  # deterministic from the seed
    assert sha256s(again) == sha256s(mixed)
    copies = pq.read_table(Path(mixed.path) / INDEX_DIR / "train", columns=["doc_id", "copy"]).to_pylist()
    assert {r["copy"] for r in copies if r["doc_id"].startswith("code")} == {0, 1}
    assert {r["copy"] for r in copies if r["doc_id"].startswith("prose")} == {0}


def test_mixture_config_is_validated():
    for bad in ({"web": -1.0}, {"": 1.0}, {"web": 1000.0}):
        with pytest.raises(ValueError, match="mixture"):
            cfg(mixture=bad)
    assert cfg(mixture={"web": 0.0, "code": 2.5}).mixture["code"] == 2.5


def write_gpt2_files(directory, extra_merges=()):
    """A tiny GPT-2 format vocabulary: the 256 byte symbols, a few merges, then <|endoftext|>."""
    symbols = sorted(gpt2_byte_decoder(), key=lambda ch: gpt2_byte_decoder()[ch])
    merges = [("d", "e"), ("de", "f"), ("Ġ", "a"), ("r", "e"), ("re", "t"), *extra_merges]
    vocab = {ch: i for i, ch in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOS] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def test_loads_a_gpt2_vocab_and_merges_pair(tmp_path, upstream):
    vocab = write_gpt2_files(tmp_path / "gpt2")
    c = cfg(tokenizer_source=str(tmp_path / "gpt2"))
    result = run_tokenize(c, upstream, str(tmp_path / "ws"))
    assert result.info["eos_id"] == vocab[EOS] == len(vocab) - 1
    assert result.info["vocab_size"] == len(vocab)
    tok = load_tokenizer(result.path)
    assert tok.encode("def ret").ids == [vocab["def"], vocab["Ġ"], vocab["ret"]]
    for _, text in DOCS:
        assert tok.decode(tok.encode(text).ids) == text
    rows, _ = read_rows(result.path, "train")
    assert rows[0, 0] == vocab[EOS] and rows.max() <= vocab[EOS]
    assert "vocab.json" in result.info["tokenizer_name"]

    write_gpt2_files(tmp_path / "gpt2", extra_merges=[("a", "b")])  # the hash is in the fingerprint
    assert plan(c, upstream, str(tmp_path / "ws"))[0] != result.fingerprint


def test_loads_a_tokenizer_json_from_a_url(tmp_path, upstream, built):
    _, trained = built
    serve = tmp_path / "serve"
    serve.mkdir()
    (serve / "tokenizer.json").write_bytes((Path(trained.path) / "tokenizer.json").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tokenizer.json"
        result = run_tokenize(cfg(tokenizer_source=url), upstream, str(tmp_path / "ws-url"))
    finally:
        server.shutdown()
    assert result.info["tokenizer_sha256"] == trained.info["tokenizer_sha256"]
    assert result.fingerprint != trained.fingerprint
    assert read_rows(result.path, "train")[0].tolist() == read_rows(trained.path, "train")[0].tolist()


def test_loads_a_tokenizer_from_a_signed_url_with_credentials_and_records_neither(tmp_path, upstream, built):
    """`tokenizer_source` with `user:p%40ss@` and `?sig=`: the server gets both (basic auth
    percent-decoded), the manifest and the result name the URL with neither, and a refused request
    fails with a message that names the URL without its secrets."""
    import base64

    _, trained = built
    body = (Path(trained.path) / "tokenizer.json").read_bytes()
    seen = []

    class Signed(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            good = self.path == "/tok/tokenizer.json?sig=GOOD-SIG" and self.headers.get("Authorization") == \
                "Basic " + base64.b64encode(b"u:p@ss").decode()
            self.send_response(200 if good else 403)
            self.end_headers()
            self.wfile.write(body if good else b"denied")

        def log_message(self, *a):
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Signed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://u:p%40ss@127.0.0.1:{server.server_address[1]}/tok/tokenizer.json"
    try:
        result = run_tokenize(cfg(tokenizer_source=base + "?sig=GOOD-SIG"), upstream, str(tmp_path / "ws"))
        with pytest.raises(OSError) as refused:
            run_tokenize(cfg(tokenizer_source=base + "?sig=BAD-SIG"), upstream, str(tmp_path / "ws-bad"))
    finally:
        server.shutdown()
    assert result.info["tokenizer_sha256"] == trained.info["tokenizer_sha256"]
    assert seen[0] == ("/tok/tokenizer.json?sig=GOOD-SIG", "Basic " + base64.b64encode(b"u:p@ss").decode())
    recorded = json.dumps(manifest_of(result)) + json.dumps(result.info) + str(refused.value)
    assert "tokenizer.json?sig=***" in recorded and "403" in str(refused.value)
    for secret in ("GOOD-SIG", "BAD-SIG", "p@ss", "p%40ss"):
        assert secret not in recorded


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


def test_partial_directory_keeps_finished_units(tmp_path, upstream, built):
    _, first = built
    out = Path(first.path)
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("part-00000-*.parquet")}
    part = out / "train" / "part-00001-0000.parquet"
    part.write_bytes(part.read_bytes()[:100])  # a crash mid-write: the unit's sizes no longer match
    (out / "stray.tmp").write_text("leftover")
    (out / "manifest.json").unlink()
    again = run_tokenize(cfg(), upstream, str(tmp_path / "ws"))
    assert not again.reused and again.counts == first.counts and again.info == first.info
    assert not (out / "stray.tmp").exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # unit 0 was not redone
    assert sha256s(again) == sha256s(first)

    (out / "manifest.json").unlink()
    (out / "tokenizer.json").write_text("{}")  # units encoded with another tokenizer: start afresh
    assert not run_tokenize(cfg(), upstream, str(tmp_path / "ws")).reused
    first_part = out / "train" / "part-00000-0000.parquet"
    assert first_part.stat().st_mtime_ns != kept[first_part]


def test_read_rows_shape_dtype_and_files(built):
    c, result = built
    assert result.info["dtype"] == "uint16" and result.info["seq_len"] == c.seq_len
    assert result.info["vocab_size"] == c.vocab_size
    for split in ("train", "val"):
        rows, n_bytes = read_rows(result.path, split)
        assert rows.dtype == np.uint16 and rows.shape == (result.counts[f"{split}_rows"], c.seq_len + 1)
        assert n_bytes.dtype == np.int64 and n_bytes.shape == (rows.shape[0],)
        assert rows.max() < result.info["vocab_size"]
        for unit in range(FILES):
            parts = sorted((Path(result.path) / split).glob(f"part-{unit:05d}-*.parquet"))
            n = unit_rows(result, split, unit).shape[0]
            assert len(parts) == -(-n // c.rows_per_file)
            table = pq.read_table(parts[0])
            assert table.schema.field("tokens").type == pa.binary()
            assert table.schema.field("n_bytes").type == pa.int32()
            assert table.num_rows == min(c.rows_per_file, n)
    with pytest.raises(ValueError):
        read_rows(result.path, "test")


def test_shards_read_with_duckdb(built):
    duckdb = pytest.importorskip("duckdb")
    c, result = built
    rows, n_bytes = read_rows(result.path, "train")
    got = duckdb.sql(f"select tokens, n_bytes from read_parquet('{result.path}/train/*.parquet', "
                     f"filename=true) order by filename, file_row_number").fetchall()
    assert len(got) == rows.shape[0]
    assert np.frombuffer(got[3][0], "<u2").tolist() == rows[3].tolist() and got[3][1] == n_bytes[3]


def test_shards_read_with_hf_datasets(built, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    c, result = built
    rows, n_bytes = read_rows(result.path, "train")
    files = sorted(str(p) for p in (Path(result.path) / "train").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == rows.shape[0]
    assert np.frombuffer(ds[3]["tokens"], "<u2").tolist() == rows[3].tolist() and ds[3]["n_bytes"] == n_bytes[3]


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


def test_split_does_not_depend_on_where_the_corpus_sits(tmp_path, monkeypatch):
    """The same text file in two directories, typed as an absolute and as a relative path: the
    same document ids, so the same validation documents and the same token rows."""
    from tasks.core.data_config import CorpusConfig
    from tasks.download.readers import read_shard
    from tasks.download.stage import run_download
    from verse_corpus import write_verse_file

    here = write_verse_file(tmp_path / "a" / "corpora" / "plays.txt", paragraphs=150)
    there = tmp_path / "b" / "elsewhere" / "plays.txt"
    there.parent.mkdir(parents=True)
    there.write_bytes(here.read_bytes())
    monkeypatch.chdir(tmp_path / "b")
    results = []
    for name, source in (("one", str(here)), ("two", "./elsewhere/plays.txt")):
        raw = run_download(CorpusConfig(sources=[{"url": source, "doc_bytes": 1024}], max_bytes=None),
                           str(tmp_path / name))
        docs = [d for s in sorted(Path(raw.path).glob("shard-*.jsonl.zst")) for d in read_shard(s)]
        up = write_corpus(tmp_path / name / "dedup", [(d["id"], d["text"]) for d in docs], files=1,
                          sources=[d["source"] for d in docs])
        results.append(run_tokenize(cfg(val_fraction=0.2), up, str(tmp_path / name / "ws")))
    one, two = results
    assert one.path != two.path
    for split in ("train", "val"):
        ids = [set(pq.read_table(Path(r.path) / INDEX_DIR / split).column("doc_id").to_pylist())
               for r in results]
        assert ids[0] == ids[1] and ids[0]
        assert all(i.startswith("plays.txt:plays.txt:") for i in ids[0])
        rows = [read_rows(r.path, split)[0] for r in results]
        assert rows[0].shape == rows[1].shape and np.array_equal(rows[0], rows[1])
    assert one.counts == two.counts and one.counts["val_docs"] >= 3
