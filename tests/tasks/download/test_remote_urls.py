"""Real-world source URLs through the whole download stage, against a local HTTP server: query
strings (format from the path), signed-URL secrets recorded nowhere, URL credentials (one parser,
percent-decoded), empty compressed files ledgered."""
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from prefect import flow  # imported before `caplog` attaches: Prefect configures logging on import

from fake_origin import Origin
from tasks.core.config import load_config, redacted_params
from tasks.core.data_config import CorpusConfig, SourceSpec
from tasks.core.protocol import read_manifest
from tasks.core.urls import redact
from tasks.download.fetch import PermanentTransferError
from tasks.download.readers import read_shard
from tasks.download.sources import CACHE_DIR
from tasks.download.stage import BadInputError, describe, run_download

FAST = {"retry_backoff_s": 0.001, "timeout_s": 10, "max_bytes": None}
SECRETS = ("TOK-SECRET", "SIG-SECRET", "AKID-SECRET")
SIGNED = "download=1&token=TOK-SECRET&X-Amz-Signature=SIG-SECRET&X-Amz-Credential=AKID-SECRET"


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


def _zst(rows: list[str]) -> bytes:
    return zstandard.ZstdCompressor().compress(("\n".join(rows) + "\n").encode())


def _docs(result) -> list[dict]:
    return [d for s in sorted(Path(result.path).glob("shard-*.jsonl.zst")) for d in read_shard(s)]


def _quarantine(result) -> list[dict]:
    return [json.loads(x) for x in (Path(result.path) / "quarantine.jsonl").read_text().splitlines()]


def test_query_string_urls_take_their_format_from_the_path(origin, tmp_path):
    origin.add("/data/a.jsonl.zst", _zst([json.dumps({"text": f"zst row {i}"}) for i in range(500)]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(20)]}), buf)
    origin.add("/data/b.parquet", buf.getvalue())
    origin.faults["/data/a.jsonl.zst"] = ["429@0", "503@0"]  # asked to come back at once, twice
    sources = [f"{origin.url}/data/a.jsonl.zst?download=1", f"{origin.url}/data/b.parquet?raw=true&v=2"]
    result = run_download(CorpusConfig(sources=sources, **FAST), str(tmp_path / "ws"))
    assert result.counts["docs"] == 520 and result.counts["quarantined"] == 0
    transfers = read_manifest(Path(result.path))["transfers"]
    assert transfers["retries"] == 2 and transfers["retry_after"] == 2 and transfers["waited_s"] == 0.0
    docs = _docs(result)
    assert docs[0] == {"id": f"{sources[0]}:a.jsonl.zst:1", "text": "zst row 0", "source": sources[0],
                       "meta": {}}
    assert docs[-1]["text"] == "parquet row 19" and docs[-1]["id"] == f"{sources[1]}:b.parquet:20"
    cached = sorted(p.name for p in (tmp_path / "ws" / CACHE_DIR).rglob("*") if p.suffix in (".zst", ".parquet"))
    assert len(cached) == 2 and cached[0].startswith("a-") and cached[0].endswith(".jsonl.zst")
    assert cached[1].startswith("b-") and cached[1].endswith(".parquet")
    assert origin.queries["/data/a.jsonl.zst"] == ["download=1"] * 3


def test_signed_url_secrets_are_recorded_nowhere(origin, tmp_path, caplog):
    origin.add("/signed/a.jsonl.zst", _zst([json.dumps({"text": "kept document"}), '{"text": broken']))
    url = f"{origin.url}/signed/a.jsonl.zst?{SIGNED}"
    cfg = load_config("debug", [f'corpus.sources=["{url}"]', "corpus.retry_backoff_s=0.001",
                                "corpus.max_bad_fraction=1.0"])
    spec = cfg.corpus.sources[0]
    assert isinstance(spec, SourceSpec) and spec.request_url() == url  # still usable
    assert spec.url == redact(url) and "download=1" in spec.url and "token=***" in spec.url

    @flow
    def takes_config(config):  # what Prefect stores as the flow run's parameters
        return None

    recorded = [json.dumps(redacted_params(cfg)), json.dumps(takes_config.serialize_parameters(
        {"config": cfg})), cfg.model_dump_json(), repr(cfg.corpus)]
    with caplog.at_level(logging.DEBUG):
        result = run_download(cfg.corpus, str(tmp_path / "ws"))
        line, report = describe(result)
    assert origin.queries["/signed/a.jsonl.zst"] == [SIGNED]  # the request carried the real query
    assert "GET /signed/a.jsonl.zst?download=1&token=***" in caplog.text  # urllib3's line, redacted
    assert result.counts == {"files": 1, "docs": 1, "quarantined": 1, "bytes": result.counts["bytes"]}
    (row,) = _quarantine(result)
    assert row["file"] == redact(url) and row["reason_code"] == "malformed_json"
    manifest = read_manifest(Path(result.path))
    assert manifest["sources"][0]["path"] == redact(url)
    recorded += [caplog.text, line, "\n".join(report), json.dumps(_docs(result))]
    recorded += [p.read_text(errors="replace") for p in (tmp_path / "ws").rglob("*")
                 if p.is_file() and p.suffix != ".zst" and p.suffix != ".parquet"]
    with pytest.raises(PermanentTransferError) as err:  # an error message names the URL redacted
        run_download(CorpusConfig(sources=[f"{origin.url}/signed/missing.jsonl.zst?{SIGNED}"], **FAST),
                     str(tmp_path / "ws2"))
    recorded.append(str(err.value))
    assert "token=***" in err.value.args[0]
    for text in recorded:
        for secret in SECRETS:
            assert secret not in text, (secret, text[:500])


def test_url_credentials_are_parsed_once_and_percent_decoded(origin, tmp_path):
    for name in ("a", "b", "c"):
        origin.add(f"/p/{name}.jsonl.zst", _zst([json.dumps({"text": f"from {name}"})]))
        origin.auth[f"/p/{name}.jsonl.zst"] = "user:p@ss"  # the server checks the Basic header
    host = origin.url.removeprefix("http://")
    sources = [f"http://user:p%40ss@{host}/p/a.jsonl.zst",   # encoded, as it should be
               f"http://user:p@ss@{host}/p/b.jsonl.zst",     # not encoded: split at the last `@`
               {"url": f"http://{host}/p/c.jsonl.zst", "auth": "user:p@ss"}]
    cfg = CorpusConfig(sources=sources, **FAST)
    for spec, given in zip(cfg.sources, sources[:2]):
        assert spec.auth.get_secret_value() == "user:p@ss" and spec.url == redact(given)
        assert spec.url.startswith(f"http://{host}/p/")
    result = run_download(cfg, str(tmp_path / "ws"))
    assert [d["text"] for d in _docs(result)] == ["from a", "from b", "from c"]
    assert all(origin.gets[f"/p/{n}.jsonl.zst"] == 1 for n in "abc")  # no 401 first
    for p in (tmp_path / "ws").rglob("*"):
        if p.is_file() and p.suffix != ".zst":
            assert b"p@ss" not in p.read_bytes() and b"p%40ss" not in p.read_bytes(), p


def test_empty_compressed_files_are_ledgered(origin, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jsonl.zst").write_bytes(_zst([json.dumps({"text": f"good {i}"}) for i in range(9)]))
    (src / "empty.jsonl.zst").write_bytes(b"")
    (src / "empty.json.gz").write_bytes(b"")
    remote = origin.add("/e.jsonl.zst", b"")
    cfg = CorpusConfig(sources=[str(src), remote], max_bad_fraction=0.5, **FAST)
    result = run_download(cfg, str(tmp_path / "ws"))
    assert result.counts["docs"] == 9 and result.counts["quarantined"] == 3
    rows = {Path(r["file"]).name: r for r in _quarantine(result)}
    assert sorted(rows) == ["e.jsonl.zst", "empty.json.gz", "empty.jsonl.zst"]
    for name, row in rows.items():
        assert row["reason_code"] == "truncated_stream" and row["line"] == 1
        assert "empty file (0 bytes)" in row["reason"] and name in row["reason"]
    assert result.info["quarantine_reasons"] == {"truncated_stream": 3}
    by_file = {Path(s["path"]).name: s for s in read_manifest(Path(result.path))["sources"]}
    assert by_file["empty.jsonl.zst"]["docs"] == 0 and by_file["empty.jsonl.zst"]["quarantined"] == 1
    # on its own, an empty file is all the input there is: the stage fails, naming the ledger
    with pytest.raises(BadInputError, match="1 of 1 records quarantined.*truncated_stream"):
        run_download(CorpusConfig(sources=[str(src / "empty.jsonl.zst")], **FAST), str(tmp_path / "ws3"))
