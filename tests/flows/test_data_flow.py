"""Data flow: download -> clean -> dedup; per-shard tasks on a Dask LocalCluster give the same output
as the default process-pool runner (tokenize, the last step, is covered by the pipeline test)."""
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from planted_corpus import planted, write_text_files  # tests/helpers (pytest pythonpath)

from flows.data import run_data  # noqa: E402
from tasks.core.config import PipelineConfig  # noqa: E402
from tasks.core.protocol import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs, truth = planted(seed=11, distinct=60, near=20, exact=5, words=(120, 200))
    return write_text_files(docs, tmp_path_factory.mktemp("data-corpus")), truth


def _config(root: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "corpus": {"sources": [str(root)], "max_bytes": None, "shard_bytes": 20_000},
        "clean": {"workers": 2}, "dedup": {"workers": 2}})


def _hashes(result) -> list[str]:
    return [f["sha256"] for f in read_manifest(Path(result.path))["files"]]


def test_dask_runner_matches_default_runner(corpus, tmp_path):
    distributed = pytest.importorskip("distributed")
    root, truth = corpus
    cfg = _config(root)
    with prefect_test_harness(server_startup_timeout=180):  # slow under load on 2 cores
        default = run_data(cfg, str(tmp_path / "default"), through="dedup")
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                      dashboard_address=None) as cluster:
            dask = run_data(cfg, str(tmp_path / "dask"), runner="dask",
                            address=cluster.scheduler_address, through="dedup")
    assert default["clean"].counts == dask["clean"].counts
    assert _hashes(default["clean"]) == _hashes(dask["clean"])
    assert _hashes(default["dedup"]) == _hashes(dask["dedup"])
    assert default["clean"].info["shards_run"] >= 3  # several shards were mapped
    d = default["dedup"].counts
    assert d["docs_in"] == default["clean"].counts["kept"] == d["kept"] + d["duplicates"]
    assert d["duplicates"] >= sum(j >= 0.9 for _, j, _ in truth.values()) * 0.95
