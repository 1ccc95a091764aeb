"""infra/: Kubernetes manifests and the `gpu` job template validate offline against the Kubernetes
schemas (kubernetes-validate ships them); the template registers on a Prefect test server as a
`kubernetes` work pool and renders, through the Kubernetes worker's own code, into a valid GPU Job;
compose.yaml names the services and holds no literal secret; the image is CUDA-based and non-root.
"""
import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S = INFRA / "k8s"
TEMPLATE = json.loads((K8S / "gpu-job-template.json").read_text())
K8S_VERSION = kubernetes_validate.latest_version()
SECRETISH = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|API_KEY", re.I)
REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:\?[^}]*)?\}$")  # ${VAR} or ${VAR:?message}, no default


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _validate_job(job: dict) -> None:
    """The Kubernetes worker insists on `parallelism: 1, completions: 1` in the pod spec too (its
    manifest check, prefect_kubernetes.worker._get_base_job_manifest), where the API ignores them;
    the schema (strict: no unknown fields) is checked without exactly those two."""
    job = json.loads(json.dumps(job))
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    _validate(job)


def test_every_manifest_validates_against_the_kubernetes_schemas():
    kinds = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            _validate(doc)
            kinds.append((doc["kind"], doc["metadata"]["name"]))
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "neo", path
    assert sorted(kinds) == sorted([
        ("Namespace", "neo"), ("PersistentVolumeClaim", "neo-workspace"), ("Secret", "neo-secrets"),
        ("ServiceAccount", "prefect-worker"), ("ServiceAccount", "neo-job"), ("Role", "prefect-worker"),
        ("RoleBinding", "prefect-worker"), ("Deployment", "prefect-worker-gpu")])
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert secret["stringData"] and set(secret["stringData"].values()) == {""}, "the example holds no values"


def test_the_validator_rejects_a_broken_manifest():
    """Guards the test above: a misspelt field and a wrong type are both refused (strict mode)."""
    pvc = yaml.safe_load((K8S / "workspace-pvc.yaml").read_text())
    pvc["spec"]["acessModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(pvc)
    job = json.loads(json.dumps(TEMPLATE["job_configuration"]["job_manifest"]))
    job["spec"]["backoffLimit"] = "zero"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_job(job)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


async def _register_and_render(job_variables: dict):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=TEMPLATE))
        pool = await client.read_work_pool("gpu")
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            pool.base_job_template, job_variables, client=client)
    flow_run = FlowRun(id=uuid.uuid4(), name="brave-panda", flow_id=uuid.uuid4())
    config.prepare_for_flow_run(flow_run)
    return pool, config, flow_run


def test_job_template_registers_as_kubernetes_pool_and_renders_a_valid_gpu_job(prefect_server):
    pool, config, flow_run = asyncio.run(_register_and_render(
        {"image": "registry.example.com/neo-pipeline:1.0", "gpus": "4", "env": {"NEO_EXTRA": "yes"}}))
    assert pool.type == "kubernetes"
    assert pool.base_job_template == TEMPLATE, "the server stored the template unchanged"

    job = config.job_manifest
    _validate_job(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NEO_TRAIN_NPROC"] == "4" and env["NNODES"] == "1" and env["NEO_HOME"] == "/workspace"
    assert env["NEO_EXTRA"] == "yes" and env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["image"] == "registry.example.com/neo-pipeline:1.0"
    assert container["envFrom"] == [{"secretRef": {"name": "neo-secrets"}}]
    assert {v["name"]: v for v in pod["volumes"]}["workspace"]["persistentVolumeClaim"] == {
        "claimName": "neo-workspace"}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/workspace", "/dev/shm"}
    assert pod["serviceAccountName"] == "neo-job" and job["metadata"]["namespace"] == "neo"
    assert job["metadata"]["generateName"] == "brave-panda-"
    assert config.namespace == "neo" and config.pod_watch_timeout_seconds == 900


def _literal_secrets(spec: dict, text: str) -> list[str]:
    """Secret-looking environment values that are not a ${VAR} reference, and user:password@ URLs
    whose password is not a shell variable ($$VAR / $$(cat secret file))."""
    found = [f"{name}.{key} = {value!r}" for name, svc in spec["services"].items()
             for key, value in (svc.get("environment") or {}).items()
             if SECRETISH.search(key) and not key.endswith("_FILE") and not REFERENCE.match(str(value))]
    found += [f"URL password {pw!r}" for pw in re.findall(r"://[^/\s:@\"]+:([^@\s]+)@", text)
              if not pw.startswith("$$")]
    return found


def test_compose_names_the_services_and_holds_no_literal_secret():
    text = (INFRA / "compose.yaml").read_text()
    spec = yaml.safe_load(text)
    assert set(spec["services"]) == {"postgres", "prefect-server", "prefect-worker", "mlflow", "minio",
                                     "minio-init"}
    worker = spec["services"]["prefect-worker"]
    assert worker["command"][worker["command"].index("--pool") + 1] == "cpu"
    assert spec["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert _literal_secrets(spec, text) == []
    secret_refs = [v for svc in spec["services"].values() for k, v in (svc.get("environment") or {}).items()
                   if SECRETISH.search(k) and not k.endswith("_FILE")]
    assert len(secret_refs) == 4  # MinIO root password (x2), and the MLflow server's S3 key pair
    assert spec["secrets"]["postgres_password"] == {"environment": "POSTGRES_PASSWORD"}
    # The check itself catches a literal value, a default and a password written into a URL.
    spec["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"] = "hunter22"
    spec["services"]["mlflow"]["environment"]["AWS_SECRET_ACCESS_KEY"] = "${MINIO_ROOT_PASSWORD:-hunter22}"
    assert len(_literal_secrets(spec, text + "\n# postgresql://neo:hunter22@db/x\n")) == 3

    # Every variable compose reads is documented in .env.example, with a placeholder for secrets.
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    assert all("CHANGE_ME" in v for k, v in example.items() if SECRETISH.search(k))
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_dockerfile_is_a_non_root_cuda_image_with_the_pinned_torch():
    lines = [ln.strip() for ln in (INFRA / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) == 1 and froms[0].startswith("nvidia/cuda:") and "runtime" in froms[0]
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not [ln for ln in lines if re.match(r"(ENV|ARG)\b", ln, re.I) and SECRETISH.search(ln)]
    deps = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if d.startswith("torch")]
    assert torch_pin in " ".join(lines), f"Dockerfile must install {torch_pin} like pyproject.toml"
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {"**/.env", ".venv", ".neo"} <= set(ignored)
