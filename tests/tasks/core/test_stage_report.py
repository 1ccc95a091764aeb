"""Stage reports: a chart per data stage (PNG in the stage directory and in an MLflow run of that stage
output, linked from the report by the MLflow server's artifact URL) and no zero counts listed.

The data stages run once, in-process, over a planted corpus with duplicates, too-short documents
and unreadable files, so every chart has something to show."""
from pathlib import Path

import pytest

from planted_corpus import planted, write_text_files  # tests/helpers (pytest pythonpath)

from tasks.clean.stage import describe as describe_clean, run_clean
from tasks.core import charts, tracking
from tasks.core.data_config import CleanConfig, CorpusConfig, DedupConfig, TokenizerConfig
from tasks.core.protocol import verify_manifest
from tasks.core.stage_report import EXPERIMENT, publish_chart, report_markdown
from tasks.dedup.stage import run_dedup
from tasks.download.stage import run_download
from tasks.tokenize.stage import run_tokenize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    docs, _ = planted(seed=5, distinct=40, near=12, exact=4, words=(80, 160))
    docs += [{"id": f"short-{i}", "text": f"tiny note {i}\n", "source": "gen"} for i in range(3)]
    root = write_text_files(docs, tmp_path_factory.mktemp("corpus"))
    (root / "broken.txt").write_bytes(b"\xff\xfe not utf-8 \xc3\x28\n")
    (root / "empty.txt").write_text("")
    ws = str(tmp_path_factory.mktemp("ws"))
    raw = run_download(CorpusConfig(sources=[str(root)], max_bytes=None, max_bad_fraction=0.5), ws)
    cleaned = run_clean(CleanConfig(workers=1), raw, ws)
    deduped = run_dedup(DedupConfig(workers=1), cleaned, ws)
    tokens = run_tokenize(TokenizerConfig(vocab_size=300, seq_len=32, val_fraction=0.2), deduped, ws)
    return {"ws": ws, "download": raw, "clean": cleaned, "dedup": deduped, "tokenize": tokens}


def test_the_corpus_exercises_every_chart(stages):
    assert stages["download"].counts["quarantined"] >= 2
    assert any(v for k, v in stages["clean"].counts.items() if k.startswith("rejected:"))
    assert any(v == 0 for k, v in stages["clean"].counts.items() if k.startswith("rejected:"))
    assert stages["dedup"].info["exact"] > 0 and stages["dedup"].info["near"] > 0


@pytest.mark.parametrize("stage", ["download", "clean", "dedup", "tokenize"])
def test_each_data_stage_chart_is_a_png(stages, stage):
    png = charts.CHARTS[stage](stages[stage])
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    assert charts.draw(stages[stage]) is not None


def test_clean_counts_document_lengths_before_and_after(stages):
    """The clean chart's length histogram: every document read is in `in`, every kept one in `kept`,
    each in its power-of-two bin of characters (checked against the stage's own output)."""
    import pyarrow.parquet as pq

    from tasks.clean.shard import LENGTH_BINS, length_bin
    from tasks.download.readers import read_shard

    cleaned, raw = stages["clean"], stages["download"]
    hist = cleaned.info["length_hist"]
    assert len(hist["in"]) == len(hist["kept"]) == LENGTH_BINS
    assert sum(hist["in"]) == cleaned.counts["docs_in"] and sum(hist["kept"]) == cleaned.counts["kept"]
    want_in, want_kept = [0] * LENGTH_BINS, [0] * LENGTH_BINS
    for shard in sorted(Path(raw.path).glob("*.jsonl.zst")):
        for doc in read_shard(shard):
            want_in[length_bin(len(doc["text"]))] += 1
    for part in sorted(Path(cleaned.path).glob("docs-*.parquet")):
        for text in pq.read_table(part, columns=["text"]).column("text").to_pylist():
            want_kept[length_bin(len(text))] += 1
    assert (hist["in"], hist["kept"]) == (want_in, want_kept)
    assert (length_bin(0), length_bin(1), length_bin(1023), length_bin(1024)) == (0, 0, 9, 10)
    # the chart grows a second panel for it
    plain = charts.clean_chart(cleaned.model_copy(update={"info": {**cleaned.info, "length_hist": None}}))
    assert len(charts.clean_chart(cleaned)) > len(plain)


def test_stages_without_a_chart_draw_none(stages):
    assert charts.draw(stages["tokenize"].model_copy(update={"stage": "train"})) is None


@pytest.mark.parametrize("stage", ["download", "clean", "dedup", "tokenize"])
def test_chart_is_in_the_stage_dir_and_the_stage_run_and_linked(stages, stage):
    result = stages[stage]
    chart = publish_chart(result)
    assert chart.file == Path(result.path) / charts.CHART_FILE
    assert chart.file.read_bytes().startswith(PNG_MAGIC)
    assert verify_manifest(Path(result.path)) == []  # the chart is no part of the stage's output
    c = tracking.client(stages["ws"])
    run = c.get_run(chart.run_id)
    assert run.data.tags["neo.stage"] == stage and run.data.tags["neo.fingerprint"] == result.fingerprint
    assert run.info.run_name == f"{stage}-{result.fingerprint}"
    assert c.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert [a.path for a in c.list_artifacts(chart.run_id)] == [charts.CHART_FILE]
    assert chart.url == (f"http://127.0.0.1:5000/get-artifact?path={charts.CHART_FILE}"
                         f"&run_uuid={chart.run_id}")
    assert publish_chart(result).run_id == chart.run_id  # a rerun finds the run of that output again


def test_clean_report_lists_no_zero_counts_and_links_the_chart(stages):
    result = stages["clean"]
    chart = publish_chart(result)
    md = report_markdown("clean", result, describe_clean(result)[1], chart)
    assert f"![clean chart]({chart.url})" in md and chart.run_id in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows and not any(line.endswith("| 0 |") for line in rows), rows
    assert not any(": 0" in line for line in md.splitlines() if line.startswith("- lines removed")), md
    zero = [k for k, v in result.counts.items() if v == 0]
    assert zero and not any(f"| {k} |" in md for k in zero)
    assert f"| kept | {result.counts['kept']:,} |" in md


def test_report_without_a_chart_has_no_image(stages):
    md = report_markdown("train", stages["tokenize"].model_copy(update={"stage": "train"}))
    assert "![" not in md
