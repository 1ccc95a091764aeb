"""A stage's report: the markdown of its Prefect artifact and, for a data stage, its chart.

The chart (`tasks/core/charts.py`) is written to `<stage dir>/report.png` after the manifest (no
manifest lists it, so the directory still verifies and its fingerprint does not change) and logged
as the artifact `report.png` of an MLflow run of its own: one run per stage output, named
`<stage>-<fingerprint>` and tagged `neo.stage` / `neo.fingerprint`, in the experiment training
uses by default (`neo-pipeline`), created once and found again by a rerun. The report links the
image through the MLflow server's artifact URL, so the Prefect UI shows it: the tracking server's
own URL when `MLFLOW_TRACKING_URI` is one, else the `mlflow ui` of the embedded store at
`registry.ui_url`'s default (`http://127.0.0.1:5000`). Nothing here imports Prefect
(`tasks/core/prefect_stage.py` publishes the markdown); MLflow loads only when a chart is logged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tasks.core import charts, tracking
from tasks.core.protocol import StageResult, atomic_path
from tasks.core.train_config import RegistryConfig, TrainConfig

EXPERIMENT = TrainConfig.model_fields["experiment"].default
UI_URL = RegistryConfig.model_fields["ui_url"].default


@dataclass(frozen=True)
class Chart:
    file: Path
    """The PNG in the stage directory."""
    run_id: str
    artifact: str
    """The PNG's path among the MLflow run's artifacts."""
    url: str
    """Where a browser gets the PNG from the MLflow server."""


def workspace_of(result: StageResult) -> Path:
    """A stage output lives at `<workspace>/<stage>/<fingerprint>`."""
    return Path(result.path).parents[1]


def artifact_url(workspace: str | Path, run_id: str, path: str) -> str:
    uri = tracking.tracking_uri(workspace)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL.rstrip("/")
    return f"{base}/get-artifact?path={quote(path)}&run_uuid={run_id}"


def stage_run(c, workspace: str | Path, stage: str, fp: str) -> str:
    """The MLflow run of one stage output: found by its tags, else created (and marked finished)."""
    exp = tracking.experiment_id(c, EXPERIMENT, workspace)
    runs = c.search_runs([exp], f"tags.`neo.stage` = '{stage}' and tags.`neo.fingerprint` = '{fp}'",
                         max_results=1, order_by=["attributes.start_time ASC"])
    if runs:
        return runs[0].info.run_id
    run = c.create_run(exp, run_name=f"{stage}-{fp}", tags={"neo.stage": stage, "neo.fingerprint": fp})
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def publish_chart(result: StageResult) -> Chart | None:
    """Draw the stage's chart into its directory and its MLflow run; None for a stage without one."""
    png = charts.draw(result)
    if png is None:
        return None
    file = Path(result.path) / charts.CHART_FILE
    with atomic_path(file) as tmp:
        tmp.write_bytes(png)
    workspace = workspace_of(result)
    c = tracking.client(workspace)
    run_id = stage_run(c, workspace, result.stage, result.fingerprint)
    c.log_artifact(run_id, str(file))
    return Chart(file, run_id, charts.CHART_FILE, artifact_url(workspace, run_id, charts.CHART_FILE))


def report_markdown(stage: str, result: StageResult, lines: list[str] | None = None,
                    chart: Chart | None = None) -> str:
    """The stage report: where the output is, its chart, its non-zero counts, the stage's notes."""
    body = [f"# {stage}", "", f"- fingerprint: `{result.fingerprint}`", f"- output: `{result.path}`",
            f"- reused existing output: {result.reused}"]
    if chart is not None:
        body += ["", f"![{stage} chart]({chart.url})", "",
                 f"- chart: `{chart.file}`, artifact `{chart.artifact}` of MLflow run `{chart.run_id}` "
                 f"(experiment `{EXPERIMENT}`)"]
    counts = charts.nonzero(result.counts)
    body += ["", "| count | value |", "|---|---|",
             *([f"| {k} | {v:,} |" for k, v in counts.items()] or ["| (none) | 0 |"])]
    if lines:
        body += ["", *lines]
    return "\n".join(body)
