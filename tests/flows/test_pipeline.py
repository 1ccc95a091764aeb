"""End to end: the whole flow on a tiny generated corpus, under prefect_test_harness.

Checks manifests, document accounting, the MLflow run and registry, Prefect's records of the runs,
cross-run caching, invalidation by a helper edit, and retry of a transient download failure.
"""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterId, FlowRunFilterParentFlowRunId)
from prefect.testing.utilities import prefect_test_harness

import tasks.core.protocol
from flows.pipeline import neo_pipeline
from tasks.core import tracking
from tasks.core.config import load_config
from tasks.core.protocol import read_manifest, verify_manifest

STAGES = ["download", "clean", "dedup", "tokenize", "train", "evaluate", "register"]
WORDS = ("alpha beta gamma delta value index count total result items name data buffer offset "
         "record token stream parse render config update merge split").split()


def _python_doc(rng: random.Random, i: int) -> str:
    lines = [f'"""Module {i}: helpers for {rng.choice(WORDS)} handling."""', "import os", ""]
    for f in range(rng.randint(3, 6)):
        a, b = rng.sample(WORDS, 2)
        lines += [f"def {a}_{b}_{f}({a}, {b}=None):",
                  f'    """Return the {a} merged with {b}."""',
                  f"    if {b} is None:",
                  f"        {b} = {rng.randint(0, 99)}",
                  f"    return [{a}, {b}, {rng.choice(WORDS)!r}]", ""]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """70 generated Python files, 5 exact duplicates, 3 too short, a jsonl with one malformed line."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    docs = [_python_doc(rng, i) for i in range(70)]
    for i, text in enumerate(docs):
        (root / f"mod_{i:03d}.py").write_text(text)
    for i in range(5):
        (root / f"copy_{i}.py").write_text(docs[i])
    for i in range(3):
        (root / f"short_{i}.py").write_text("x = 1\n")
    lines = [json.dumps({"text": _python_doc(rng, 100 + i)}) for i in range(4)]
    (root / "extra.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    return {"root": root, "files": 70 + 5 + 3 + 1, "docs": 70 + 5 + 3 + 4, "duplicates": 5,
            "short": 3, "quarantined": 1}


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=180):  # slow under load on 2 cores
        yield


def _config(corpus, *extra):
    return load_config("debug", [f"corpus.sources=['{corpus['root']}']", "corpus.max_bytes=null",
                                 "eval.samples=1", *extra])


def _run(cfg, ws):
    state = neo_pipeline(config=cfg, workspace=str(ws), return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def _flow_tree(client, flow_run_id) -> list:
    """The flow run and its subflow runs, transitively (neo_pipeline runs the data and train flows)."""
    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        frontier = [c.id for c in children]
        ids += frontier
    return ids


def _stage_names(flow_run_id, expected: int = len(STAGES)) -> dict[str, str]:
    """Stage -> final state name, from the task run names (`<stage>-<fingerprint>`) in the flow run
    and its subflow runs."""
    import time

    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while True:  # task-run states are written asynchronously: wait until every run has one
            tree = _flow_tree(client, flow_run_id)
            runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=tree)))
                    if r.name.rsplit("-", 1)[0] in STAGES]
            done = len(runs) >= expected and all(r.state is not None and r.state.is_final() for r in runs)
            if done or time.time() > deadline:
                break
            time.sleep(0.2)
    return ({r.name.rsplit("-", 1)[0]: r.state.name if r.state else None for r in runs},
            {r.name.rsplit("-", 1)[0]: r for r in runs})


@pytest.fixture(scope="module")
def first_run(harness, corpus, tmp_path_factory):
    import tasks.download.stage as dl

    ws = tmp_path_factory.mktemp("ws")
    progress: list[dict] = []
    dl.PROGRESS_HOOKS.append(progress.append)  # what the CLI's progress bar listens to
    try:
        summary, flow_run_id = _run(_config(corpus), ws)
    finally:
        dl.PROGRESS_HOOKS.remove(progress.append)
    return {"ws": ws, "summary": summary, "flow_run_id": flow_run_id, "cfg": _config(corpus),
            "progress": progress}


def test_end_to_end_outputs_accounting_and_registry(first_run, corpus):
    s = first_run["summary"]
    st = s.stages
    assert list(st) == STAGES
    for name, r in st.items():
        assert read_manifest(Path(r.path)) is not None, name
        assert verify_manifest(Path(r.path)) == [], name
    # download: every file read, the malformed line quarantined with a reason naming file and line
    dl = st["download"].counts
    assert dl["docs"] == corpus["docs"] and dl["quarantined"] == 1
    assert first_run["progress"][-1]["fraction"] == 1.0 and first_run["progress"][-1]["docs"] == dl["docs"]
    quarantine = (Path(st["download"].path) / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == 1 and "extra.jsonl" in quarantine[0]
    # clean -> dedup -> tokenize: documents in = kept + rejected + duplicates at every stage
    cl, dd, tk = st["clean"].counts, st["dedup"].counts, st["tokenize"].counts
    assert cl["docs_in"] == dl["docs"]
    assert cl["docs_in"] == cl["kept"] + sum(v for k, v in cl.items() if k.startswith("rejected:"))
    assert cl.get("rejected:too_short", 0) == corpus["short"]
    assert dd["docs_in"] == cl["kept"] and dd["duplicates"] == corpus["duplicates"]
    assert dd["kept"] + dd["duplicates"] == dd["docs_in"]
    assert tk["docs_in"] == dd["kept"] == tk["train_docs"] + tk["val_docs"]
    assert tk["val_rows"] > 0 and tk["train_rows"] > 0
    # train/eval
    cfg = first_run["cfg"]
    assert st["train"].counts["steps"] == cfg.train.max_steps
    m = st["evaluate"].info["metrics"]
    assert 0 < m["val_bpb"] < 20 and m["val_ppl"] > 1 and m["unigram_val_bpb"] > 0
    # MLflow: one run holding metrics, params and the registered version with alias champion
    c = tracking.client(first_run["ws"])
    mv = c.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(mv.version) == s.version == "1" and s.alias == "champion"
    assert mv.run_id == s.run_id == st["train"].info["run_id"]
    run = c.get_run(s.run_id)
    assert run.data.metrics["val_bpb"] == pytest.approx(m["val_bpb"])
    assert len(c.get_metric_history(s.run_id, "train_loss")) >= cfg.train.max_steps // cfg.train.log_every
    assert run.data.params["train.max_steps"] == str(cfg.train.max_steps)
    artifacts = {a.path for a in c.list_artifacts(s.run_id)}
    assert {"lineage", "eval", "hf_model"} <= artifacts
    assert {a.path for a in c.list_artifacts(s.run_id, "lineage")} == {f"lineage/{n}" for n in STAGES[:6]}


def test_prefect_records_one_completed_task_run_per_stage(first_run):
    states, runs = _stage_names(first_run["flow_run_id"])
    assert set(states) == set(STAGES)
    assert all(v == "Completed" for v in states.values()), states
    fps = {n: r.fingerprint for n, r in first_run["summary"].stages.items()}
    assert {n: r.name for n, r in runs.items()} == {n: f"{n}-{fps[n][:10]}" for n in STAGES}
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=_flow_tree(client, first_run["flow_run_id"]))))
    reports = {a.key: a for a in arts if a.key and a.key.endswith("-report")}
    assert set(reports) == {f"{n}-report" for n in STAGES}
    # no "unknown" artifacts: the untyped records of persisted results (a pickle path in the Prefect home)
    assert [(a.type, a.data) for a in arts if a.type is None] == []
    link = next(a for a in arts if a.key == "registered-model")
    assert f"#/models/{first_run['cfg'].registry.model_name}/versions/1" in link.data
    assert f"`{fps['dedup']}`" in reports["dedup-report"].data


def test_data_stage_reports_show_their_charts_from_mlflow(first_run):
    """Each data stage's report links its chart by the MLflow artifact URL of its stage run, lists
    no zero count, and the training run holds the charts with the lineage manifests."""
    st = first_run["summary"].stages
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=_flow_tree(client, first_run["flow_run_id"]))))
    reports = {a.key: a.data for a in arts if a.key and a.key.endswith("-report")}
    c = tracking.client(first_run["ws"])
    for stage in ("download", "clean", "dedup", "tokenize"):
        r = st[stage]
        [run] = c.search_runs([c.get_experiment_by_name("neo-pipeline").experiment_id],
                              f"tags.`neo.stage` = '{stage}' and tags.`neo.fingerprint` = '{r.fingerprint}'")
        assert [a.path for a in c.list_artifacts(run.info.run_id)] == ["report.png"]
        assert (Path(r.path) / "report.png").is_file() and verify_manifest(Path(r.path)) == []
        assert (f"](http://127.0.0.1:5000/get-artifact?path=report.png&run_uuid={run.info.run_id})"
                in reports[f"{stage}-report"])
        assert "report.png" in {a.path.rsplit("/", 1)[-1] for a in c.list_artifacts(
            st["train"].info["run_id"], f"lineage/{stage}")}
    assert "| 0 |" not in reports["clean-report"] and "| rejected:too_short | 3 |" in reports["clean-report"]


def test_registered_model_generates_text(first_run):
    import mlflow

    with tracking.fluent(first_run["ws"]):
        gen = mlflow.pyfunc.load_model(f"models:/{first_run['cfg'].registry.model_name}@champion")
    out = gen.predict({"prompt": ["def alpha"]}, params={"max_new_tokens": 8, "seed": 1})
    assert len(out) == 1 and isinstance(out[0], str) and len(out[0]) > 0


def test_unchanged_rerun_is_served_from_cache(first_run, corpus):
    ws = first_run["ws"]
    mtimes = {n: (Path(r.path) / "manifest.json").stat().st_mtime_ns
              for n, r in first_run["summary"].stages.items()}
    summary, flow_run_id = _run(first_run["cfg"], ws)
    states, _ = _stage_names(flow_run_id)
    assert states == {n: "Cached" for n in STAGES}
    assert {n: r.reused for n, r in summary.stages.items()} == {n: True for n in STAGES}
    assert not any(r.reused for r in first_run["summary"].stages.values())
    assert {n: (Path(r.path) / "manifest.json").stat().st_mtime_ns for n, r in summary.stages.items()} == mtimes
    assert summary.version == "1"
    c = tracking.client(ws)
    assert len(c.search_model_versions(f"name = '{first_run['cfg'].registry.model_name}'")) == 1


def test_train_eval_register_flow_reuses_the_same_stages(first_run, tmp_path):
    """The train-eval-register deployment's flow, given the tokens directory, is the same work."""
    from flows.train import neo_train_eval_register, tokens_result

    tokens = first_run["summary"].stages["tokenize"]
    assert tokens_result(tokens.path).fingerprint == tokens.fingerprint
    with pytest.raises(FileNotFoundError, match="not a complete tokenize stage"):
        tokens_result(tmp_path)
    state = neo_train_eval_register(tokens_dir=tokens.path, config=first_run["cfg"],
                                    workspace=str(first_run["ws"]), return_state=True)
    assert state.is_completed()
    assert state.result()["register"].fingerprint == first_run["summary"].stages["register"].fingerprint
    states, _ = _stage_names(state.state_details.flow_run_id, expected=3)
    assert states == {"train": "Cached", "evaluate": "Cached", "register": "Cached"}


def test_worse_model_becomes_challenger(first_run, corpus):
    cfg = _config(corpus, "train.max_steps=2", "train.warmup_steps=1")
    summary, flow_run_id = _run(cfg, first_run["ws"])
    states, _ = _stage_names(flow_run_id)
    assert {n: states[n] for n in STAGES[:4]} == {n: "Cached" for n in STAGES[:4]}
    assert {n: states[n] for n in STAGES[4:]} == {n: "Completed" for n in STAGES[4:]}
    assert summary.version == "2" and summary.alias == "challenger"
    assert summary.val_bpb > first_run["summary"].val_bpb
    c = tracking.client(first_run["ws"])
    assert str(c.get_model_version_by_alias(cfg.registry.model_name, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(cfg.registry.model_name, "challenger").version) == "2"


def test_editing_a_stage_helper_reruns_that_stage_and_later(first_run, corpus, tmp_path, monkeypatch):
    """Edit a helper function of the clean stage (not the task function, which Prefect's TASK_SOURCE
    would see) in a copy of the sources: clean and everything after it re-run, download stays cached."""
    root = tmp_path / "src"
    for pkg in tasks.core.protocol.PROJECT_PACKAGES:
        shutil.copytree(tasks.core.protocol.PROJECT_ROOT / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    clean_py = root / "tasks" / "clean" / "filters.py"
    src = clean_py.read_text()
    marker = "\ndef "  # first helper function defined in the module
    idx = src.index(marker)
    clean_py.write_text(src[:idx] + "\n_EDITED_HELPER_CONSTANT = 1\n" + src[idx:])
    monkeypatch.setattr(tasks.core.protocol, "PROJECT_ROOT", root)
    summary, flow_run_id = _run(first_run["cfg"], first_run["ws"])
    states, _ = _stage_names(flow_run_id)
    assert states["download"] == "Cached"
    assert {n: states[n] for n in STAGES[1:]} == {n: "Completed" for n in STAGES[1:]}, states
    assert summary.stages["clean"].fingerprint != first_run["summary"].stages["clean"].fingerprint
    assert summary.stages["download"].fingerprint == first_run["summary"].stages["download"].fingerprint


def test_transient_download_failure_is_retried(harness, corpus, tmp_path, monkeypatch):
    import tasks.download.task as dl

    calls = {"n": 0}
    real = dl.run_download

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("injected transient failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(dl, "run_download", flaky)
    from prefect import flow

    @flow
    def only_download(cfg):
        return dl.download(cfg, str(tmp_path), return_state=True)

    state = only_download(_config(corpus).corpus)
    assert calls["n"] == 2
    assert state.is_completed()
    result = state.result()
    assert result.counts["docs"] == corpus["docs"]
    with get_client(sync_client=True) as client:
        tr = client.read_task_run(state.state_details.task_run_id)
    assert tr.run_count == 2


def test_cli_models_promote_rollback_and_export_hf(first_run, tmp_path):
    """Runs after the challenger and helper-edit tests: version 1 is champion, a later one challenger."""
    import transformers
    from typer.testing import CliRunner

    from flows.cli.main import app
    from tasks.register import registry
    from tasks.evaluate.evals.scoring import rolling_nll
    from neo_model import GPTNeo

    ws, name = str(first_run["ws"]), first_run["cfg"].registry.model_name
    runner = CliRunner()
    out = runner.invoke(app, ["models", name, "-w", ws])
    assert out.exit_code == 0, out.output
    c = tracking.client(ws)
    challenger = registry.alias_version(c, name, "challenger")
    assert challenger not in (None, "1")
    lines = out.output.splitlines()
    assert any(line.split()[:2] == ["1", "champion"] for line in lines), out.output
    assert any(line.split()[:2] == [challenger, "challenger"] for line in lines), out.output
    out = runner.invoke(app, ["promote", name, challenger, "-w", ws])
    assert out.exit_code == 0 and "was 1" in out.output, out.output
    assert registry.alias_version(c, name, "champion") == challenger
    out = runner.invoke(app, ["rollback", name, "-w", ws])
    assert out.exit_code == 0, out.output
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    assert runner.invoke(app, ["rollback", name, "-w", ws]).exit_code == 2  # nothing left to roll back to

    dest = tmp_path / "hf"
    out = runner.invoke(app, ["export-hf", f"{name}@champion", str(dest), "-w", ws])
    assert out.exit_code == 0, out.output
    hf = transformers.GPTNeoForCausalLM.from_pretrained(dest, attn_implementation="eager").eval()
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(dest)
    ours = GPTNeo.from_pretrained(dest)
    from tasks.tokenize.bpe import load_tokenizer

    text = "def alpha_beta_0(alpha, beta=None):\n    return [alpha, beta]\n"
    ids = load_tokenizer(first_run["summary"].stages["tokenize"].path).encode(text).ids
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == ours.config.eos_token_id
    # Perplexity on the export: ours equals transformers' on the same text.
    x = torch.tensor([[ours.config.eos_token_id] + ids])
    with torch.no_grad():
        hf_loss = hf(x, labels=x).loss.item()
    assert rolling_nll(ours, ids, ours.config.eos_token_id) / len(ids) == pytest.approx(hf_loss, abs=1e-4)


def test_mlflow_models_serve_round_trip(first_run, tmp_path):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` answers completions over HTTP,
    and honours the request's params: greedy (temperature 0) completions of exactly the requested
    number of new tokens, equal to the model's own greedy decoding."""
    import os
    import sys
    import urllib.request

    import mlflow

    from flows.cli.procs import free_port, start_process, stop_process, wait_http

    name = first_run["cfg"].registry.model_name
    port = free_port()
    # The scoring server runs `uvicorn` from PATH: the venv's bin directory must be on it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(first_run["ws"]),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    proc = start_process([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], log, env)
    prompts = ["def ", "import "]
    requests = {n: {"max_new_tokens": n, "temperature": 0.0} for n in (3, 12)}

    def post(params: dict) -> list[str]:
        body = json.dumps({"dataframe_records": [{"prompt": p} for p in prompts], "params": params})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["predictions"]

    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        served = {n: post(params) for n, params in requests.items()}
    finally:
        stop_process(proc, 30)
    assert "Ignoring provided params" not in log.read_text()
    with tracking.fluent(first_run["ws"]):
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.metadata.get_params_schema() is not None
    gen = loaded.unwrap_python_model()
    eos = gen.model.config.eos_token_id
    for n, params in requests.items():
        assert loaded.predict({"prompt": prompts}, params=params) == served[n]
        for prompt, text in zip(prompts, served[n]):
            ids = gen.tokenizer.encode(prompt).ids
            out = gen.model.generate(torch.tensor([ids]), max_new_tokens=n, temperature=0.0, eos_token_id=eos)
            new = out[0, len(ids):].tolist()
            assert len(new) == n and text == gen.tokenizer.decode(new)
    assert served[3] != served[12]  # max_new_tokens reached the model


def test_readme_serving_section_walked_as_written(first_run, tmp_path):
    """The README's `mlflow models serve` command and request body, copied from README.md itself (only
    the store, the model name and the port swapped for this test's), run from the repository root:
    the answer is the model's own greedy decoding of exactly the requested number of tokens."""
    import os
    import sys
    import urllib.request

    import mlflow
    from readme import README, inline_code

    from flows.cli.procs import free_port, start_process, stop_process, wait_http

    serve, body = inline_code("mlflow models serve"), inline_code('"dataframe_records"')
    name, port = first_run["cfg"].registry.model_name, free_port()
    swaps = {"sqlite:///.neo/mlflow/mlflow.db": tracking.tracking_uri(first_run["ws"]),
             "models:/gpt-neo-tiny@": f"models:/{name}@", "-p 5001": f"-p {port}"}
    root = README.parent
    if not (root / ".venv" / "bin").is_dir():  # tests run from another venv: the README's is the Makefile's
        swaps[".venv/bin"] = os.path.dirname(sys.executable)
    cmd = serve
    for old, new in swaps.items():
        assert old in cmd, f"README's serve command no longer has {old!r}: {serve}"
        cmd = cmd.replace(old, new)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the command sets it
    log = tmp_path / "serve.log"
    proc = start_process(["bash", "-c", cmd], log, env, cwd=root)
    request = json.loads(body)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            served = json.loads(r.read())["predictions"]
    finally:
        stop_process(proc, 30)
    with tracking.fluent(first_run["ws"]):
        gen = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model()
    (record,), n = request["dataframe_records"], request["params"]["max_new_tokens"]
    ids = gen.tokenizer.encode(record["prompt"]).ids
    out = gen.model.generate(torch.tensor([ids]), max_new_tokens=n, temperature=0.0,
                             eos_token_id=gen.model.config.eos_token_id)
    assert served == [gen.tokenizer.decode(out[0, len(ids):].tolist())] and 0 < out.shape[1] - len(ids) <= n


def test_hand_off_to_a_pool_nobody_serves_fails_naming_the_pool(first_run):
    """`retrain` hands training to a deployment on a pool without a worker: the run fails within the
    start timeout, naming the pool and how to serve it, and the waiting child run is cancelled."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.train import neo_train_eval_register

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="nobody-serves-this", type="process"))
    dep_id = neo_train_eval_register.to_deployment(name="unserved", work_pool_name="nobody-serves-this").apply()
    state = neo_pipeline(config=first_run["cfg"], workspace=str(first_run["ws"]), return_state=True,
                         train_deployment="neo_train_eval_register/unserved", handoff_start_timeout=2)
    assert state.is_failed()
    assert "work pool 'nobody-serves-this' has no live worker" in state.message
    assert "prefect worker start --pool nobody-serves-this" in state.message
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [(c.name, c.state.name) for c in children] == [(f"train-{first_run['cfg'].name}", "Cancelled")]
    fp = first_run["summary"].stages["tokenize"].fingerprint
    assert f"hand-off-{first_run['cfg'].name}-{fp[:10]}" in {t.name for t in tasks}
