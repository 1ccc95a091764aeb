"""The thin Prefect layer every stage task shares: cache keys, run names, retries, logs and reports.

A stage's `task.py` decorates its task with `stage_task(STAGE, plan, describe=...)`, where `plan(**task
parameters) -> (fingerprint, directory)` and `describe(result) -> (log line, report lines)` come from
its Prefect-free `stage.py`; the task logs the line and writes the report as a markdown artifact.
The cache key is the stage fingerprint (config + inputs + code version), so an unchanged rerun is served from Prefect's cache across flow runs, while any change to config, input or
code gives a new key. A cache hit is only honoured while the stage directory is still complete.
"""
from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from tasks.core.protocol import Stage, StageResult, read_manifest, stable_hash
from tasks.core.stage_report import publish_chart, report_markdown
from tasks.core.urls import redact

Plan = Callable[..., tuple[str, Path]]
Describe = Callable[[StageResult], tuple[str, list[str]]]

RETRY_BACKOFF_S = 2.0
"""First retry waits ~2 s, then ~4 s, ~8 s (each +/- 50% jitter)."""


def _cache_key(stage: str, plan: Plan) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        fp, directory = plan(**parameters)
        base = f"neo-{stage}-{fp}-{stable_hash(str(Path(directory).resolve()), 8)}"
        if read_manifest(directory) is None and _has_record(context, base):
            # A cached result exists but its output was deleted or damaged since: never serve it.
            # Run under a one-off key instead; the rebuilt directory makes `base` valid again.
            return f"{base}-rebuild-{uuid.uuid4().hex[:8]}"
        return base

    return key


def _has_record(context: TaskRunContext, key: str) -> bool:
    store = getattr(context, "result_store", None)
    try:
        return bool(store is not None and store.exists(key))
    except Exception:  # an unreadable record is as good as none
        return False


def _run_name(stage: str, plan: Plan) -> Callable[[], str]:
    def name() -> str:
        from prefect.runtime import task_run

        try:
            fp, _ = plan(**task_run.parameters)
            return f"{stage}-{fp[:10]}"
        except Exception:  # naming must never fail a run
            return stage

    return name


def stage_task(stage: Stage, plan: Plan, *, describe: Describe | None = None, retries: int = 0,
               **options: Any):
    """Decorate a stage function as a cached, named, optionally retried Prefect task that logs and
    reports its result (`describe`)."""
    retry_opts: dict[str, Any] = {}
    if retries:
        retry_opts = {"retries": retries,
                      "retry_delay_seconds": exponential_backoff(backoff_factor=RETRY_BACKOFF_S)(retries),
                      "retry_jitter_factor": 0.5}

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> StageResult:
            result = fn(*args, **kwargs)
            if describe is not None:
                line, lines = describe(result)
                get_run_logger().info(line)
                report(stage.name, result, lines)
            return result

        return task(name=stage.name, cache_key_fn=_cache_key(stage.name, plan), persist_result=True,
                    task_run_name=_run_name(stage.name, plan), **retry_opts, **options)(run)

    return decorate


def report(stage: str, result: StageResult, lines: list[str] | None = None) -> None:
    """One markdown artifact per stage run: its chart (data stages, `tasks/core/stage_report.py`),
    non-zero counts, where the output is, stage-specific notes. A chart that cannot be drawn or
    logged is a warning, never a failed stage."""
    try:
        chart = publish_chart(result)
    except Exception as exc:
        chart = None
        get_run_logger().warning(f"{stage}: report chart not published: {redact(str(exc))}")
    create_markdown_artifact(key=f"{stage}-report", markdown=report_markdown(stage, result, lines, chart),
                             description=f"{stage} stage report")
