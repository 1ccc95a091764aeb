"""Flow `neo_data`: download -> clean -> dedup -> tokenize, with the per-shard work mapped over shards.

Two ways to run the per-shard units (`tasks/core/units.py`), with byte-identical output:
- `runner="processes"` (default): clean and dedup are one cached stage task each, which runs its
  shards in a local process pool. In embedded mode this is the fast choice: a process-based Prefect
  task runner boots an ephemeral API server in every worker process (REFERENCE.md section 6).
- `runner="dask"`: every shard unit is a Prefect task, mapped on a `DaskTaskRunner` (prefect-dask):
  a cluster at `address`, or a local one. The global steps (linking, the LSH candidate search,
  manifests) run in the flow.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

from prefect import flow, task
from prefect.runtime import flow_run

from tasks.clean.shard import clean_shard
from tasks.clean.stage import describe as describe_clean, run_clean
from tasks.clean.task import clean
from tasks.core import storage
from tasks.core.config import PipelineConfig, default_workspace, resolve_config
from tasks.core.prefect_stage import report
from tasks.core.protocol import StageResult
from tasks.dedup.shard import signature_shard, write_dedup_shard
from tasks.dedup.stage import describe as describe_dedup, run_dedup
from tasks.dedup.task import dedup
from tasks.download.task import download
from tasks.tokenize.task import tokenize

Runner = Literal["processes", "dask"]


@task(name="clean-shard", task_run_name="clean-shard-{out}")
def clean_shard_task(cfg: Any, shard: str, out: str, reasons: tuple[str, ...]) -> dict:
    """Clean one raw shard (reused when its output directory is complete)."""
    return clean_shard(cfg, shard, out, reasons)


@task(name="signature-shard", task_run_name="signature-shard-{out}")
def signature_shard_task(cfg: Any, docs: str, out: str) -> dict:
    """Exact keys, MinHash signatures and band keys of one clean shard."""
    return signature_shard(cfg, docs, out)


@task(name="dedup-write-shard", task_run_name="dedup-write-shard-{out}")
def write_shard_task(docs: str, out: str, rows: list[int], ledger: list[dict]) -> dict:
    """One clean shard minus its duplicates, plus its ledger."""
    return write_dedup_shard(docs, out, rows, ledger)


UNIT_TASKS = {clean_shard: clean_shard_task, signature_shard: signature_shard_task,
              write_dedup_shard: write_shard_task}


def prefect_mapper(fn: Callable[..., Any], jobs: list[tuple]) -> list[Any]:
    """Map the Prefect task wrapping `fn` over `jobs` on the flow's task runner; results in order."""
    if not jobs:
        return []
    futures = UNIT_TASKS[fn].map(*(list(column) for column in zip(*jobs)))
    return [f.result() for f in futures]


def run_task(stage_task: Any, *args: Any) -> StageResult:
    """Run a stage task; a result served from Prefect's cache (state `Cached`) says `reused`, as a
    result rebuilt from a complete stage directory does (a cached result is the stored first one)."""
    state = stage_task(*args, return_state=True)
    result = state.result()  # raises the task's error when it failed
    return result.model_copy(update={"reused": True}) if state.name == "Cached" else result


def run_name(prefix: str):
    """A flow-run namer: `<prefix>-<preset or config name>`, so runs say what they ran."""
    def name() -> str:
        cfg = flow_run.parameters.get("config")
        label = flow_run.parameters.get("preset") or (
            cfg.get("name") if isinstance(cfg, dict) else getattr(cfg, "name", None))
        return f"{prefix}-{label or 'default'}"

    return name


Overrides = Optional[dict[str, Any]]
"""Deployment parameter `overrides`: {"section.key": value}, applied like `neo run --set`."""


@flow(name="neo_data", flow_run_name=run_name("data"), log_prints=True)
def neo_data(config: PipelineConfig = PipelineConfig(), workspace: str | None = None,
             per_shard_tasks: bool = False, through: Literal["dedup", "tokenize"] = "tokenize",
             preset: Optional[str] = None, overrides: Overrides = None) -> dict[str, StageResult]:
    """Prepare training data: raw shards, cleaned, de-duplicated and tokenized. `preset` (a name in
    configs/) with `overrides` replaces `config` when given. `workspace` may be an fsspec URL (e.g.
    s3://bucket/prefix): stages then compute in a local working copy and share their outputs through
    it (`tasks/core/storage.py`)."""
    config = resolve_config(config, preset, overrides)  # a bad preset or key fails before any work
    ws = storage.attach(workspace or str(default_workspace()))
    raw = run_task(download, config.corpus, ws)
    if per_shard_tasks:
        cleaned = run_clean(config.clean, raw, ws, mapper=prefect_mapper)
        report("clean", cleaned, describe_clean(cleaned)[1])
        deduped = run_dedup(config.dedup, cleaned, ws, mapper=prefect_mapper)
        report("dedup", deduped, describe_dedup(deduped)[1])
    else:
        cleaned = run_task(clean, config.clean, raw, ws)
        deduped = run_task(dedup, config.dedup, cleaned, ws)
    stages = {"download": raw, "clean": cleaned, "dedup": deduped}
    if through == "tokenize":
        stages["tokenize"] = run_task(tokenize, config.tokenizer, deduped, ws)
    return stages


def run_data(config: PipelineConfig, workspace: str | None = None, runner: Runner = "processes",
             address: str | None = None,
             through: Literal["dedup", "tokenize"] = "tokenize") -> dict[str, StageResult]:
    """Run `neo_data` with the chosen task runner (`address`: a Dask scheduler, else a local one)."""
    if runner == "processes":
        return neo_data(config, workspace, per_shard_tasks=False, through=through)
    from prefect_dask import DaskTaskRunner

    dask = DaskTaskRunner(address=address) if address else DaskTaskRunner()
    return neo_data.with_options(task_runner=dask)(config, workspace, per_shard_tasks=True,
                                                   through=through)
