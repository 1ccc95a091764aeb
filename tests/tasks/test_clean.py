"""Clean stage: Unicode repair that leaves source code intact, rejections with a ledger, reuse."""
import ast
from pathlib import Path

import ftfy
import pyarrow.parquet as pq
import pytest

from tasks.clean import fixer_config, iter_parquet_docs, plan, repair, run_clean
from tasks.config import CleanConfig, CorpusConfig
from tasks.download import run_download
from tasks.stage import MANIFEST, StageResult, read_manifest, sha256_file

# Source code full of things ftfy's default fixes rewrite: curly quotes, ligatures, full-width
# characters, HTML entities, terminal escapes, tabs and form feeds inside strings.
CODE = '''"""A module whose string literals ftfy's default settings would rewrite."""
import re

QUOTES = "\u201ccurly\u201d and \u2018single\u2019"
LIGATURES = "\ufb01le \ufb02ow"
WIDE = "\uff21\uff22\uff23\u3000\uff11\uff12\uff13"
ENTITIES = "&amp; &lt;tag&gt; &eacute;"
ESCAPES = "\x1b[31mred\x1b[0m"
WHITESPACE = "tab\there, form\x0cfeed"
NAIVE = "na\u00efve caf\u00e9 r\u00e9sum\u00e9"


def shout(text: str) -> str:
    """Upper-case `text` with whitespace runs collapsed."""
    return re.sub(r"\\s+", " ", text).upper()
'''
MOJIBAKE = "The caf\u00c3\u00a9 serves cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e every morning.\n"
REPAIRED = "The caf\u00e9 serves cr\u00e8me br\u00fbl\u00e9e every morning.\n"
CFG = CleanConfig(min_chars=10, max_chars=600)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> StageResult:
    root = tmp_path_factory.mktemp("clean")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "code.py").write_text(CODE, encoding="utf-8")
    (corpus / "mojibake.txt").write_text(MOJIBAKE, encoding="utf-8")
    (corpus / "blank.txt").write_text("  \n\t\n")
    (corpus / "nothing.txt").write_text("")
    (corpus / "short.txt").write_text("tiny")
    (corpus / "long.txt").write_text("x" * 700)
    # shard_bytes=1: one document per raw shard, so outputs and ledgers are per shard.
    return run_download(CorpusConfig(sources=[str(corpus)], max_bytes=None, shard_bytes=1),
                        str(root / "ws"))


def _docs(result: StageResult) -> dict[str, str]:
    return {Path(d["id"].rsplit(":", 1)[1]).name: d["text"] for d in iter_parquet_docs(Path(result.path))}


def test_source_code_keeps_its_ast_and_mojibake_is_repaired(raw, tmp_path):
    assert ftfy.fix_text(CODE) != CODE  # the default settings would damage this code
    result = run_clean(CFG, raw, str(tmp_path))
    docs = _docs(result)
    assert ast.dump(ast.parse(docs["code.py"])) == ast.dump(ast.parse(CODE))
    assert docs["code.py"] == CODE
    assert docs["mojibake.txt"] == REPAIRED
    assert result.info["repaired"] == 1


def test_only_broken_lines_are_fixed():
    fixer = fixer_config(CleanConfig())
    text = CODE + "# caf\u00c3\u00a9 au lait\n"
    assert repair(text, fixer) == CODE + "# caf\u00e9 au lait\n"


def test_normalization_forms():
    decomposed = "caf" + "e\u0301" + " \ufb01"
    assert repair(decomposed, fixer_config(CleanConfig())) == "caf\u00e9 \ufb01"
    assert repair(decomposed, fixer_config(CleanConfig(normalization="NFKC"))) == "caf\u00e9 fi"
    assert repair(decomposed, fixer_config(CleanConfig(normalization="none"))) == decomposed


def test_rejections_land_in_the_ledger_and_counts_add_up(raw, tmp_path):
    result = run_clean(CFG, raw, str(tmp_path))
    assert result.counts == {"docs_in": 6, "kept": 2, "rejected:empty": 2, "rejected:too_short": 1,
                             "rejected:too_long": 1}
    c = result.counts
    assert c["docs_in"] == c["kept"] + sum(v for k, v in c.items() if k.startswith("rejected:"))
    ledger = pq.read_table(sorted(Path(result.path).glob("rejected/rejected-*.parquet"))).to_pylist()
    by_file = {Path(r["id"].rsplit(":", 1)[1]).name: (r["reason"], r["n_chars"]) for r in ledger}
    assert by_file == {"blank.txt": ("empty", 5), "nothing.txt": ("empty", 0),
                       "short.txt": ("too_short", 4), "long.txt": ("too_long", 700)}
    assert {r["source"] for r in ledger} == {str(Path(raw.path).parents[2] / "corpus")}


def test_manifest_matches_files_one_output_per_raw_shard(raw, tmp_path):
    result = run_clean(CFG, raw, str(tmp_path))
    directory = Path(result.path)
    manifest = read_manifest(directory)
    paths = [f["path"] for f in manifest["files"]]
    assert sorted(p for p in paths if p.startswith("docs-")) == [f"docs-{i:05d}.parquet" for i in range(6)]
    assert sorted(p for p in paths if p.startswith("rejected/")) == [
        f"rejected/rejected-{i:05d}.parquet" for i in range(6)]
    for f in manifest["files"]:
        assert sha256_file(directory / f["path"]) == f["sha256"]
        assert pq.ParquetFile(directory / f["path"]).metadata.num_rows == f["rows"]
    code_shard = pq.ParquetFile(directory / "docs-00001.parquet")  # sorted: blank.txt, code.py, ...
    assert code_shard.schema_arrow.names == ["id", "text", "source"]
    assert code_shard.metadata.row_group(0).column(1).compression == "ZSTD"
    assert manifest["inputs"] == [raw.fingerprint]


def test_iter_parquet_docs_order_and_columns(raw, tmp_path):
    result = run_clean(CFG, raw, str(tmp_path))
    ids = [d["id"] for d in iter_parquet_docs(Path(result.path), columns=("id",))]
    assert [Path(i.rsplit(":", 1)[1]).name for i in ids] == ["code.py", "mojibake.txt"]
    assert all(set(d) == {"id", "text", "source"} for d in iter_parquet_docs(Path(result.path)))


def test_rerun_reuses_and_partial_directory_is_rebuilt(raw, tmp_path):
    ws = str(tmp_path)
    _, directory = plan(CFG, raw, ws)
    directory.mkdir(parents=True)
    (directory / "docs-00001.parquet").write_bytes(b"half written")
    first = run_clean(CFG, raw, ws)
    assert not first.reused and pq.ParquetFile(directory / "docs-00001.parquet").metadata.num_rows == 1
    before = (directory / MANIFEST).stat().st_mtime_ns
    again = run_clean(CFG, raw, ws)
    assert again.reused and again.counts == first.counts
    assert (directory / MANIFEST).stat().st_mtime_ns == before
    assert plan(CleanConfig(min_chars=11, max_chars=600), raw, ws)[0] != first.fingerprint


def test_incomplete_upstream_is_refused(raw, tmp_path):
    missing = raw.model_copy(update={"path": str(tmp_path / "nowhere")})
    with pytest.raises(RuntimeError, match="incomplete"):
        run_clean(CFG, missing, str(tmp_path / "ws"))
