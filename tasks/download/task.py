"""The `download` Prefect task: retried only when a retry can succeed, with a progress artifact."""
from __future__ import annotations

from typing import Any, Callable

from prefect import get_run_logger

from tasks.core.data_config import CorpusConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult
from tasks.core.urls import redact
from tasks.download.fetch import PermanentTransferError
from tasks.download.stage import PROGRESS_HOOKS, STAGE, BadInputError, describe, plan, run_download


def _retry_worth_it(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retries the stage only when a later attempt can succeed (not 404, auth, checksum,
    bad input or a missing local source)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not isinstance(exc, (PermanentTransferError, BadInputError, FileNotFoundError))


def _progress_sink(logger: Any) -> Callable[[dict[str, float]], None]:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, Any] = {}

    def sink(p: dict[str, float]) -> None:
        line = (f"download: {p['files']:,.0f} files, {p['docs']:,.0f} docs, "
                f"{p['docs_per_s']:,.0f} docs/s, read {p['read_bytes_per_s'] / 1e6:,.1f} MB/s, "
                f"transfer {p['transfer_bytes_per_s'] / 1e6:,.1f} MB/s")
        logger.info(line)
        for hook in PROGRESS_HOOKS:
            hook(p)
        try:
            if "id" not in state:
                state["id"] = create_progress_artifact(progress=100 * p["fraction"],
                                                       key="download-progress", description=line)
            else:
                update_progress_artifact(state["id"], progress=100 * p["fraction"], description=line)
        except Exception as exc:  # progress must never fail the stage (e.g. no API reachable)
            logger.debug(f"progress artifact not updated: {redact(str(exc))}")

    return sink


@stage_task(STAGE, plan, describe=describe, retries=3, retry_condition_fn=_retry_worth_it)
def download(cfg: CorpusConfig, workspace: str) -> StageResult:
    """Take the corpus sources into raw jsonl.zst shards (quarantining unreadable records)."""
    return run_download(cfg, workspace, on_progress=_progress_sink(get_run_logger()))
