"""The Prefect train task: its subprocess's output reaches the task's logs through Prefect's API, a
retry after a crash resumes from the last checkpoint, and a progress artifact tracks the training."""

import pytest
from registry_helpers import word_tokens
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tasks.train.task import train as train_task
from tasks.core import tracking
from tasks.train import faults
from tasks.core.train_config import ModelConfig, TrainConfig
from tasks.core.protocol import StageResult


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> StageResult:
    return word_tokens(tmp_path_factory, seed=2, n_docs=40, fp_char="c")


def test_retry_resumes_from_checkpoint_and_logs_reach_prefect(tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(faults.FAIL_AT, "3")  # fires only in a run that did not resume
    cfg = TrainConfig(max_steps=4, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2,
                      seed=3, device="cpu", threads=1)
    model = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})
    task = train_task.with_options(retries=1, retry_delay_seconds=0, cache_policy=None,
                                        cache_key_fn=None)

    @flow
    def one_training():
        return task(cfg, model, tokens, str(tmp_path))

    with prefect_test_harness(server_startup_timeout=180), \
            temporary_settings(updates={PREFECT_LOGGING_TO_API_ENABLED: True}):
        state = one_training(return_state=True)
        result = state.result()
        flow_run_id = state.state_details.flow_run_id
        APILogWorker.drain_all(timeout=60)  # logs reach the API in batches: send the last ones first
        with get_client(sync_client=True) as client:
            logs = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            runs = client.read_task_runs()
            artifacts = client.read_artifacts()
    assert result.counts["steps"] == 4
    assert any("injected failure before step 3" in m for m in logs), logs
    assert any("resuming from" in m and "(step 2," in m for m in logs), logs  # the retry, from step 2
    assert any(m.startswith("step 1/4 loss") for m in logs), logs  # printed by the subprocess
    assert [r.run_count for r in runs if r.name.startswith("train")] == [2]
    progress = [a for a in artifacts if a.key == "train-progress"]
    # The retry creates a fresh artifact under the same key; the most recently updated one is final.
    assert progress and max(progress, key=lambda a: (a.updated, a.created)).data == 100.0
    c = tracking.client(str(tmp_path))
    steps = sorted({m.step for m in c.get_metric_history(result.info["run_id"], "train_loss")})
    assert steps == [1, 2, 3, 4]
