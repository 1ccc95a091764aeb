"""Plain-text sources: one large file cut into documents at paragraphs or at a separator (the text
kept byte for byte), and document ids that do not depend on where the corpus sits."""
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from tasks.core.data_config import CorpusConfig, SourceSpec
from tasks.download.readers import read_shard
from tasks.download.sources import list_sources, source_labels
from tasks.download.stage import run_download
from tasks.download.textsplit import HARD_FACTOR, paragraph_pieces, separator_pieces
from verse_corpus import verse_text, write_verse_file


def _docs(result) -> list[dict]:
    return [d for s in sorted(Path(result.path).glob("shard-*.jsonl.zst")) for d in read_shard(s)]


def _quarantine(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result.path) / "quarantine.jsonl").read_text().splitlines()]


def _download(tmp_path, *sources, ws="ws") -> list[dict]:
    return _docs(run_download(CorpusConfig(sources=list(sources), max_bytes=None), str(tmp_path / ws)))


# ---------------------------------------------------------------------------- paragraph splitting


def test_large_text_file_is_cut_at_paragraph_boundaries(tmp_path):
    path = write_verse_file(tmp_path / "plays" / "verse.txt", paragraphs=200)
    data = path.read_bytes()
    assert len(data) == 37_414
    sha = hashlib.sha256(data).hexdigest()  # verified while streaming: every byte is hashed
    docs = _download(tmp_path, {"url": str(path), "doc_bytes": 4096, "sha256": sha})
    assert [d["id"] for d in docs] == [f"verse.txt:verse.txt:{i}" for i in range(1, len(docs) + 1)]
    assert len(docs) == 9 and all(d["source"] == "verse.txt" for d in docs)
    texts = [d["text"].encode("utf-8") for d in docs]
    assert b"".join(texts) == data  # nothing lost, nothing added
    assert all(4096 <= len(t) <= HARD_FACTOR * 4096 for t in texts[:-1])
    for before, after in zip(texts, texts[1:]):  # every cut is at a paragraph boundary
        assert before.endswith(b"\n\n") and after[:1].strip()
    # the default (8 kB) cuts the same file too, and the same way every time
    default = _download(tmp_path, str(path), ws="ws2")
    assert [len(d["text"]) for d in default] == [len(d["text"]) for d in _download(tmp_path, str(path), ws="ws3")]
    assert len(default) == 4 and "".join(d["text"] for d in default).encode() == data


def test_small_files_code_and_doc_bytes_none_stay_one_document(tmp_path):
    src = tmp_path / "src"
    write_verse_file(src / "big.txt", paragraphs=200)
    (src / "small.txt").write_text("A small note that is one document.\n")
    code = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(600))
    (src / "module.py").write_text(code)
    assert len(code) > 8192
    docs = _download(tmp_path, str(src / "module.py"), str(src / "small.txt"),
                     {"url": str(src / "big.txt"), "doc_bytes": None})
    assert [d["id"] for d in docs] == ["module.py:module.py", "small.txt:small.txt", "big.txt:big.txt"]
    assert docs[0]["text"] == code
    # `format: txt` splits any file as plain text
    docs = _download(tmp_path, {"url": str(src / "module.py"), "format": "txt"}, ws="ws2")
    assert len(docs) > 1 and "".join(d["text"] for d in docs) == code


def test_paragraph_pieces_cut_long_paragraphs_at_lines_and_long_lines_at_characters():
    paragraph = b"".join(b"line %03d of a paragraph that never ends with a blank line\n" % i
                         for i in range(80))  # 4,800 bytes, no blank line
    long_line = "\u00e9".encode("utf-8") * 1500  # 3,000 bytes on one line, 2-byte characters
    data = b"Opening paragraph.\n\n" + paragraph + b"\n" + long_line + b"\nlast line\n"
    hasher = hashlib.sha256()
    pieces = list(paragraph_pieces(io.BytesIO(data), 256, hasher))
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()  # every byte hashed
    assert b"".join(p for p, _ in pieces) == data
    assert all(len(p) <= HARD_FACTOR * 256 for p, _ in pieces)
    for piece, _ in pieces:
        piece.decode("utf-8")  # never cut inside a character
    # the paragraph is cut at line ends only: the first cut is right after the opening paragraph
    assert pieces[0][0] == b"Opening paragraph.\n\n" and pieces[1][0].startswith(b"line 000")
    assert all(p.endswith(b"\n") for p, _ in pieces[1:5])
    line = 1  # each piece knows the line it starts on
    for piece, start in pieces:
        assert start == line
        line += piece.count(b"\n")


def test_paragraph_pieces_join_a_small_tail_and_keep_blank_runs():
    para = b"A paragraph of verse, and it ends.\n" * 4  # 140 bytes
    data = b"\n\n" + (para + b"\n\n\n") * 5 + b"The end.\n"
    pieces = [p for p, _ in paragraph_pieces(io.BytesIO(data), 256, hashlib.sha256())]
    assert b"".join(pieces) == data
    assert pieces == [b"\n\n" + (para + b"\n\n\n") * 2, (para + b"\n\n\n") * 2,
                      para + b"\n\n\nThe end.\n"]  # the small last paragraph joined the one before


# ---------------------------------------------------------------------------- separator


def test_separator_split_keeps_the_text_byte_for_byte(tmp_path):
    text = "\n\nFirst paragraph,\nof two lines.\n\nSecond.\n\n\n\nThird, after a blank run.\n\n\n"
    path = tmp_path / "src" / "paras.txt"
    path.parent.mkdir()
    path.write_text(text)
    docs = _download(tmp_path, {"url": str(path), "separator": "\n\n"})
    assert "".join(d["text"] for d in docs) == text
    assert [d["text"] for d in docs] == ["\n\nFirst paragraph,\nof two lines.\n\n", "Second.\n\n\n\n",
                                         "Third, after a blank run.\n\n\n"]
    assert [d["id"] for d in docs] == ["paras.txt:paras.txt:1", "paras.txt:paras.txt:2",
                                       "paras.txt:paras.txt:3"]
    # a pure delimiter can be left out of the text; blank pieces still make no documents
    copy = tmp_path / "other" / "paras.txt"
    copy.parent.mkdir()
    copy.write_text(text.replace("\n\n", "<|endoftext|>"))
    dropped = _download(tmp_path, {"url": str(copy), "separator": "<|endoftext|>",
                                   "keep_separator": False}, ws="ws2")
    assert [d["text"] for d in dropped] == ["First paragraph,\nof two lines.", "Second.",
                                            "Third, after a blank run.\n"]


def test_separator_pieces_stream_across_reads_and_locate_lines():
    unit = "alpha\n--\nbeta\ngamma\n--\n--\n  \n--\ndelta\n"  # blank pieces join the one before
    data = (unit * 40_000).encode()  # 1.5 MB: more than one read
    pieces = list(separator_pieces(io.BytesIO(data), "--\n", True, hashlib.sha256()))
    assert b"".join(p for p, _ in pieces) == data and len(pieces) == 1 + 2 * 40_000
    assert [p for p, _ in pieces[:3]] == [b"alpha\n--\n", b"beta\ngamma\n--\n--\n  \n--\n",
                                          b"delta\nalpha\n--\n"]
    line = 1
    for piece, start in pieces:
        assert start == line and piece.strip()
        line += piece.count(b"\n")
    assert list(separator_pieces(io.BytesIO(b" \n\n"), "\n", True, hashlib.sha256())) == [(b" \n\n", 1)]


def test_invalid_utf8_in_one_piece_is_quarantined_with_its_line(tmp_path):
    text = verse_text(60).encode("utf-8")
    broken = text.replace(b"summer's day?", b"summer's d\xffay?", 2)  # in the 1st and a later piece
    path = tmp_path / "src" / "broken.txt"
    path.parent.mkdir()
    path.write_bytes(broken)
    result = run_download(CorpusConfig(sources=[{"url": str(path), "doc_bytes": 1024}], max_bytes=None,
                                       max_bad_fraction=0.5), str(tmp_path / "ws"))
    lines = [r["line"] for r in _quarantine(result)]
    expected = [i + 1 for i, line in enumerate(broken.split(b"\n")) if b"\xff" in line]
    assert lines == expected and len(expected) == 2
    assert result.counts["docs"] + result.counts["quarantined"] == len(_docs(result)) + 2


# ---------------------------------------------------------------------------- location independence


def test_ids_do_not_depend_on_where_the_corpus_sits(tmp_path, monkeypatch):
    here = write_verse_file(tmp_path / "a" / "corpora" / "plays.txt", paragraphs=120)
    there = tmp_path / "b" / "deep" / "copy" / "corpora" / "plays.txt"
    there.parent.mkdir(parents=True)
    there.write_bytes(here.read_bytes())
    absolute = _download(tmp_path, str(here), ws="ws1")
    monkeypatch.chdir(tmp_path / "b" / "deep")
    relative = _download(tmp_path, "copy/../copy/corpora/plays.txt", ws="ws2")
    assert len(absolute) == 3
    assert [(d["id"], d["source"], d["text"]) for d in absolute] == \
        [(d["id"], d["source"], d["text"]) for d in relative]
    assert absolute[0]["id"] == "plays.txt:plays.txt:1"
    # a directory source is named by its own name, wherever it is
    dirs = [_download(tmp_path, str(p.parent), ws=f"ws-dir{i}") for i, p in enumerate((here, there))]
    assert [d["id"] for d in dirs[0]] == [d["id"] for d in dirs[1]]
    assert dirs[0][0]["id"] == "corpora:plays.txt:1"


def test_labels_take_parent_folders_only_when_names_clash():
    assert source_labels(["/x/a/books", "/y/b/books", "/books", "/data/news", "python-stdlib"]) == \
        ["a/books", "b/books", "books", "news", "python-stdlib"]
    assert source_labels(["/d/dump/*.jsonl", "/d/dump/*.txt", "~/notes.txt", "/d/dump", "/d/dump"]) == \
        ["dump/*.jsonl", "dump/*.txt", "notes.txt", "dump", "dump#2"]
    # remote sources keep their URL, without credentials or secret query values
    cfg = CorpusConfig(sources=["https://bob:hunter2@example.org/data/books.txt?token=abc"])
    assert source_labels(cfg.sources) == ["https://example.org/data/books.txt?token=***"]


def test_listed_files_carry_the_labels(tmp_path):
    for name in ("a", "b"):
        write_verse_file(tmp_path / name / "books" / "one.txt", paragraphs=5)
    files, _ = list_sources(CorpusConfig(sources=[str(tmp_path / "a" / "books"),
                                                  str(tmp_path / "b" / "books")], max_bytes=None))
    assert [f.doc_id for f in files] == ["a/books:one.txt", "b/books:one.txt"]
    assert os.path.isabs(files[0].path) and SourceSpec(url="x").doc_bytes == 8192


@pytest.mark.parametrize("target", [256, 1000])
def test_paragraph_pieces_on_any_target_rebuild_the_file(target):
    data = verse_text(80).encode("utf-8")
    pieces = [p for p, _ in paragraph_pieces(io.BytesIO(data), target, hashlib.sha256())]
    assert b"".join(pieces) == data and all(len(p) >= target for p in pieces[:-1])
