"""The `register` Prefect task: tags the MLflow run with its Prefect flow run and links the
registered model version as an artifact."""
from __future__ import annotations

from prefect.artifacts import create_link_artifact

from tasks.core.train_config import RegistryConfig
from tasks.core.prefect_stage import stage_task
from tasks.core.protocol import StageResult
from tasks.register.stage import STAGE, describe, model_version_url, plan, run_register


def _prefect_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = flow_run.id
        url = flow_run.ui_url  # "None/flow-runs/..." when no UI URL is configured (embedded mode)
        if url and url.startswith(("http://", "https://")):
            tags["prefect.flow_run_url"] = url
    return tags


@stage_task(STAGE, plan, describe=describe, retries=3)
def register(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult],
             params: dict[str, str], workspace: str) -> StageResult:
    """Log and register the model in MLflow; the gate aliases it champion or challenger."""
    result = run_register(cfg, upstream, lineage, params, workspace, run_tags=_prefect_tags())
    i = result.info
    create_link_artifact(key="registered-model", link=model_version_url(cfg, workspace, i["version"]),
                         link_text=f"{i['model_name']} v{i['version']}", description="MLflow model version")
    return result
