"""Workspace on S3-compatible storage: moto's server on 127.0.0.1 plays the bucket.

The data flow with `workspace="s3://..."` computes in a local working copy and mirrors every stage
directory to the bucket (manifest last); its token shards equal a local-workspace run's byte for
byte; a second machine (a fresh local cache) reuses every stage from the bucket without computing;
a remote directory without its manifest, or with a file of another size or content, is not trusted.
MLflow keeps an S3 workspace's artifacts in the bucket (MLFLOW_S3_ENDPOINT_URL).
"""
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.testing.utilities import prefect_test_harness

from planted_corpus import planted, write_text_files  # tests/helpers (pytest pythonpath)

from flows.data import run_data  # noqa: E402
from flows.train import tokens_result  # noqa: E402
from tasks.core import storage, tracking  # noqa: E402
from tasks.core.config import load_config  # noqa: E402
from flows.cli.procs import free_port  # noqa: E402
from tasks.core.protocol import MANIFEST, read_manifest  # noqa: E402

BUCKET = "neo-ws"
URL = f"s3://{BUCKET}/team/ws"
DATA_STAGES = ("download", "clean", "dedup", "tokenize")  # each stage's output folder is its name
KEYS = {"AWS_ACCESS_KEY_ID": "AKIDNEOTEST", "AWS_SECRET_ACCESS_KEY": "neo-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free 127.0.0.1 port, the environment pointing at it, one bucket."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (test extra) not installed")
    import s3fs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", storage.ENV_OPTIONS):
            mp.delenv(var, raising=False)
        for var, value in {**KEYS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
                           storage.ENV_MIRRORS: "{}"}.items():
            mp.setenv(var, value)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs, _ = planted(seed=5, distinct=40, near=10, exact=4, words=(120, 200))
    root = write_text_files(docs, tmp_path_factory.mktemp("s3-corpus"))
    return load_config("debug", [f"corpus.sources=['{root}']", "corpus.max_bytes=null",
                                 "corpus.shard_bytes=20000", "clean.workers=1", "dedup.workers=1"])


def _remote(fs, result) -> str:
    """The bucket path of a stage result computed in the attached workspace's local copy."""
    url = storage.remote_url(result.path)
    assert url and url.startswith(URL + "/"), (result.path, url)
    return url.removeprefix("s3://")


def _token_hashes(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in manifest["files"] if f["path"].endswith(".parquet")}


def _machine(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """A fresh machine: its own local cache, nothing attached yet."""
    mp.setenv(storage.ENV_CACHE, str(cache))
    mp.setenv(storage.ENV_MIRRORS, "{}")


def test_data_flow_on_s3_workspace(s3, corpus, tmp_path, monkeypatch):
    cfg = corpus
    with prefect_test_harness(server_startup_timeout=180):  # slow under load on 2 cores
        local = run_data(cfg, str(tmp_path / "local"))
        _machine(monkeypatch, tmp_path / "cache-a")
        first = run_data(cfg, URL)
        # Machine A computed every stage in its local copy and mirrored it to the bucket.
        assert not any(r.reused for r in first.values())
        for stage, result in first.items():
            assert Path(result.path).is_relative_to(tmp_path / "cache-a")
            assert result.fingerprint == local[stage].fingerprint and result.counts == local[stage].counts
            remote = _remote(s3, result)
            assert remote == f"{BUCKET}/team/ws/{stage}/{result.fingerprint}"
            manifest = json.loads(s3.cat_file(f"{remote}/{MANIFEST}"))
            assert manifest == read_manifest(Path(result.path))
            listed = {p.removeprefix(remote + "/"): info["size"]
                      for p, info in s3.find(remote, detail=True).items()}
            assert all(listed[f["path"]] == f["bytes"] for f in manifest["files"])
        tokens = _remote(s3, first["tokenize"])
        local_manifest = read_manifest(Path(local["tokenize"].path))
        shards = _token_hashes(local_manifest)
        assert any(p.startswith("train/") for p in shards) and any(p.startswith("val/") for p in shards)
        for rel, sha in shards.items():  # byte for byte what the local-workspace run wrote
            blob = s3.cat_file(f"{tokens}/{rel}")
            assert hashlib.sha256(blob).hexdigest() == sha
            assert blob == (Path(local["tokenize"].path) / rel).read_bytes()
        table = pq.read_table(f"{tokens}/{min(p for p in shards if p.startswith('train/'))}", filesystem=s3)
        assert table.num_rows > 0 and table.num_rows <= first["tokenize"].counts["train_rows"]

        # Machine B: a fresh local cache reuses every stage from the bucket, computing nothing.
        _machine(monkeypatch, tmp_path / "cache-b")
        second = run_data(cfg, URL)
        assert {s: r.reused for s, r in second.items()} == dict.fromkeys(DATA_STAGES, True)
        assert {s: r.counts for s, r in second.items()} == {s: r.counts for s, r in first.items()}
        copy_b = storage.local_root(URL)
        assert copy_b.is_relative_to(tmp_path / "cache-b") and (copy_b / "tokenize").is_dir()
        assert not (copy_b / "clean" / "shards").exists()  # no shard was cleaned or signed
        assert not (copy_b / "dedup" / "signatures").exists()
        assert _token_hashes(read_manifest(Path(second["tokenize"].path))) == shards

        # A partial upload (manifest missing) is not trusted: machine C recomputes tokenize only.
        s3.rm_file(f"{tokens}/{MANIFEST}")
        _machine(monkeypatch, tmp_path / "cache-c")
        third = run_data(cfg, URL)
    assert {s: r.reused for s, r in third.items()} == {**dict.fromkeys(DATA_STAGES, True), "tokenize": False}
    assert _token_hashes(json.loads(s3.cat_file(f"{tokens}/{MANIFEST}"))) == shards  # uploaded again

    # A complete manifest over a damaged file is not trusted either: wrong size, then wrong bytes.
    _machine(monkeypatch, tmp_path / "cache-d")
    target = Path(storage.attach(URL)) / "tokenize" / first["tokenize"].fingerprint
    rel, url = min(shards), storage.remote_url(target)
    good = s3.cat_file(f"{tokens}/{rel}")
    s3.pipe_file(f"{tokens}/{rel}", good[:-1])
    assert storage.remote_manifest(url) is None  # a listed file of another size
    assert read_manifest(target) is None and not target.exists()
    s3.pipe_file(f"{tokens}/{rel}", bytes([good[0] ^ 0xFF]) + good[1:])
    assert storage.remote_manifest(url) is not None  # the sizes match ...
    assert read_manifest(target) is None and not target.exists()  # ... the sha256 does not
    s3.pipe_file(f"{tokens}/{rel}", good)
    # What `retrain` hands the gpu pool: the token directory's URL, fetched on first use.
    fetched = tokens_result(storage.localize(f"{URL}/tokenize/{first['tokenize'].fingerprint}"))
    assert Path(fetched.path) == target and fetched.counts == first["tokenize"].counts
    assert (target / rel).read_bytes() == good


def test_mlflow_artifacts_in_s3_workspace(s3, tmp_path, monkeypatch):
    _machine(monkeypatch, tmp_path / "cache")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert storage.attach(tmp_path / "plain") == str(tmp_path / "plain")  # a local path: as given
    assert storage.remote_url(tmp_path / "plain") is None
    ws = storage.attach(f"s3://{BUCKET}/mlflow-ws/")
    assert storage.localize(f"s3://{BUCKET}/mlflow-ws/tokens/abc") == Path(ws) / "tokens" / "abc"
    with pytest.raises(ValueError, match="s3://elsewhere/x"):
        storage.localize("s3://elsewhere/x")
    c = tracking.client(ws)
    exp = tracking.experiment_id(c, "s3-artifacts", ws)
    assert c.get_experiment(exp).artifact_location == f"s3://{BUCKET}/mlflow-ws/mlflow/artifacts"
    run = c.create_run(exp)
    note = tmp_path / "note.txt"
    note.write_bytes(b"weights would go here\n")
    c.log_artifact(run.info.run_id, str(note), artifact_path="model")
    key = f"{BUCKET}/mlflow-ws/mlflow/artifacts/{run.info.run_id}/artifacts/model/note.txt"
    assert s3.cat_file(key) == note.read_bytes()
    assert [a.path for a in c.list_artifacts(run.info.run_id, "model")] == ["model/note.txt"]
    back = Path(c.download_artifacts(run.info.run_id, "model/note.txt", str(tmp_path / "back")))
    assert back.read_bytes() == note.read_bytes()
