"""Train stage in its subprocess: output streamed, SIGKILL mid-run then bit-identical resume,
2-process DDP and FSDP2 (torchrun, gloo on CPU) equal to one process, consolidated checkpoints that
load in one process, resume on another number of processes and under the other parallel mode."""
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from registry_helpers import word_tokens
import torch
from safetensors.torch import load_file

import tasks.train.stage as train_mod
from neo_model import GPTNeo
from tasks.core import tracking
from tasks.train import faults
from tasks.core.train_config import ModelConfig, TrainConfig
from flows.cli.procs import free_port
from tasks.core.protocol import StageResult

pytestmark = pytest.mark.usefixtures("shared_mlflow")
MODEL = ModelConfig(preset="debug", overrides={"max_position_embeddings": 64})
CLOSE = dict(rel=1e-5, abs=1e-6)  # fp32: a 2-way all-reduce / reduce-scatter sums in another order


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> StageResult:
    return word_tokens(tmp_path_factory, seed=1, n_docs=60, fp_char="e")


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=2,
                val_every=3, val_batches=2, seed=5, device="cpu", threads=1)
    return TrainConfig(**{**base, **kw})


def _losses(ws, run_id, key="train_loss"):
    c = tracking.client(ws)
    return {m.step: m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def _run_id(ws, fp):
    c = tracking.client(ws)
    runs = c.search_runs([c.get_experiment_by_name("neo-pipeline").experiment_id],
                         f"tags.neo.train_fingerprint = '{fp}'", order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id


def _assert_close_tensors(got: dict, want: dict, **tol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=k)


@pytest.fixture(scope="module")
def ref(tokens, tmp_path_factory, shared_mlflow):
    """The uninterrupted single-process run (in-process): its losses, final weights and checkpoints."""
    ws = tmp_path_factory.mktemp("ref")
    res = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, str(ws), log=lambda m: None)
    return {"result": res, "losses": _losses(str(ws), res.info["run_id"]),
            "val": _losses(str(ws), res.info["run_id"], "val_loss"),
            "weights": load_file(f"{res.info['model_dir']}/model.safetensors"),
            "ckpt4": train_mod.plan(_cfg(), MODEL, tokens, str(ws))[1] / "checkpoints" / "step-00000004"}


@pytest.fixture(scope="module")
def ddp_run(tokens, tmp_path_factory, shared_mlflow):
    """2-process DDP from scratch, failing before step 5 (checkpoints at 2 and 4)."""
    ws = tmp_path_factory.mktemp("ddp")
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(faults.FAIL_AT, "5")
        with pytest.raises(RuntimeError, match="injected failure before step 5"):
            train_mod.run_train(_cfg(nproc=2), MODEL, tokens, str(ws), log=lines.append)
    fp, out = train_mod.plan(_cfg(nproc=2), MODEL, tokens, str(ws))
    run_id = _run_id(str(ws), fp)
    return {"ws": str(ws), "fp": fp, "out": out, "lines": lines, "losses": _losses(str(ws), run_id),
            "val": _losses(str(ws), run_id, "val_loss"),
            "ckpt4": out / "checkpoints" / "step-00000004"}


def test_training_entry_does_not_import_prefect():
    """The training subprocess starts without Prefect (seconds per start), MLflow or tokenizers."""
    code = ("import sys, tasks.train.entry, tasks.train.trainer, tasks.train.loader, tasks.train.spec, "
            "tasks.train.faults, tasks.train.meter; "
            "print([m for m in ('prefect', 'mlflow', 'tokenizers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sigkill_then_resume_is_bit_identical(tokens, ref, tmp_path, monkeypatch):
    ws = str(tmp_path / "b")
    monkeypatch.setenv(faults.KILL_AT, "3")  # checkpoint at step 2, killed before step 3 (step 3 not saved)
    lines = []
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        train_mod.run_train(_cfg(), MODEL, tokens, ws, log=lines.append)
    assert any(line.startswith("step 2/6 loss") for line in lines), lines  # streamed from the child
    monkeypatch.delenv(faults.KILL_AT)
    logs = []  # resumed in-process: one subprocess start fewer; the reference ran in-process too
    res = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, ws, log=logs.append)
    assert any("resuming" in m and "step 2" in m for m in logs), logs
    assert res.fingerprint == ref["result"].fingerprint  # in_process is not part of the fingerprint
    assert _losses(ws, res.info["run_id"]) == ref["losses"]
    b = load_file(f"{res.info['model_dir']}/model.safetensors")
    assert b.keys() == ref["weights"].keys()
    for k in b:
        assert torch.equal(ref["weights"][k], b[k]), k


def test_ddp_two_processes_equal_one_and_resume_on_one(tokens, ref, ddp_run):
    """Same global batch (4 rows: 2 per rank); DDP fails before step 5 (checkpoint at 4), and the
    run resumes on a single process from that checkpoint."""
    want = ref["losses"]
    assert any("on 2 x cpu (DDP, 1 CPU thread(s) per process)" in line for line in ddp_run["lines"]), ddp_run["lines"]
    assert ddp_run["fp"] == ref["result"].fingerprint
    ddp = ddp_run["losses"]
    assert sorted(ddp) == [1, 2, 3, 4, 5]
    for s in ddp:
        assert ddp[s] == pytest.approx(want[s], **CLOSE), s
    assert sorted(ref["val"]) == [3, 6] and sorted(ddp_run["val"]) == [3]
    assert ddp_run["val"][3] == pytest.approx(ref["val"][3], **CLOSE)
    logs = []
    res = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, ddp_run["ws"], log=logs.append)
    assert any("resuming" in m and "saved on 2 process(es), now 1" in m for m in logs), logs
    got = _losses(ddp_run["ws"], res.info["run_id"])
    for s in (5, 6):
        assert got[s] == pytest.approx(want[s], **CLOSE), s
    _assert_close_tensors(load_file(f"{res.info['model_dir']}/model.safetensors"), ref["weights"],
                          rtol=1e-4, atol=1e-5)


def test_fsdp_equals_ddp_and_its_checkpoint_loads_in_one_process(tokens, ref, ddp_run, tmp_path,
                                                                 monkeypatch):
    """FSDP2 over 2 gloo processes from scratch (failing before step 5): the losses of DDP and of one
    process; its step-4 checkpoint is consolidated (the single-process checkpoint's keys, shapes and
    values, logits included) and resumes on one process to the reference's end."""
    ws = str(tmp_path / "fsdp")
    lines = []
    monkeypatch.setenv(faults.FAIL_AT, "5")
    with pytest.raises(RuntimeError, match="injected failure before step 5"):
        train_mod.run_train(_cfg(nproc=2, parallel="fsdp"), MODEL, tokens, ws, log=lines.append)
    monkeypatch.delenv(faults.FAIL_AT)
    assert any("on 2 x cpu (FSDP, 1 CPU thread(s) per process)" in line for line in lines), lines
    fp, out = train_mod.plan(_cfg(nproc=2, parallel="fsdp"), MODEL, tokens, ws)
    assert fp == ref["result"].fingerprint  # parallel and nproc are not part of the fingerprint
    fsdp = _losses(ws, _run_id(ws, fp))
    assert sorted(fsdp) == [1, 2, 3, 4, 5]
    for s in fsdp:
        assert fsdp[s] == pytest.approx(ddp_run["losses"][s], **CLOSE), s
        assert fsdp[s] == pytest.approx(ref["losses"][s], **CLOSE), s
    val = _losses(ws, _run_id(ws, fp), "val_loss")  # validation through the sharded model
    assert sorted(val) == [3] and val[3] == pytest.approx(ref["val"][3], **CLOSE)

    ckpt = out / "checkpoints" / "step-00000004"
    tol = dict(rtol=1e-4, atol=1e-5)
    _assert_close_tensors(load_file(str(ckpt / "model.safetensors")),
                          load_file(str(ref["ckpt4"] / "model.safetensors")), **tol)
    _assert_close_tensors(load_file(str(ckpt / "optimizer.safetensors")),
                          load_file(str(ref["ckpt4"] / "optimizer.safetensors")), **tol)
    state, ref_state = (json.loads((d / "trainer_state.json").read_text()) for d in (ckpt, ref["ckpt4"]))
    assert state["loader"] == {**ref_state["loader"], "world_size": 2, "batch_size": 2}
    assert state["param_groups"] == ref_state["param_groups"] and state["world_size"] == 2
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(GPTNeo.from_pretrained(ckpt)(x)[0],
                                   GPTNeo.from_pretrained(ref["ckpt4"])(x)[0], **tol)

    logs = []
    res = train_mod.run_train(_cfg(in_process=True), MODEL, tokens, ws, log=logs.append)
    assert any("resuming" in m and "(step 4," in m and "saved on 2 process(es), now 1" in m
               for m in logs), logs
    got = _losses(ws, res.info["run_id"])
    for s in (5, 6):
        assert got[s] == pytest.approx(ref["losses"][s], **CLOSE), s
    assert res.info["val_loss"] == pytest.approx(ref["result"].info["val_loss"], **CLOSE)
    _assert_close_tensors(load_file(f"{res.info['model_dir']}/model.safetensors"), ref["weights"], **tol)


def test_two_nodes_resume_a_ddp_checkpoint_under_fsdp(tokens, ref, ddp_run, tmp_path):
    """Two torchrun agents on this host as nodes 0 and 1 (one process each, rendezvous at node 0's
    train.rdzv_endpoint): the task launches node 0, the test starts node 1 with the flags the task
    documents for it. They resume the DDP run's step-4 checkpoint under FSDP2 (rank 0 reads it and
    broadcasts the shards) and train on to the reference's steps 5-6 and final weights."""
    cfg = _cfg(nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", parallel="fsdp")
    ws = str(tmp_path / "nodes")
    fp, out = train_mod.plan(cfg, MODEL, tokens, ws)
    assert fp == ref["result"].fingerprint  # nnodes, rdzv_endpoint, parallel: launch settings
    shutil.copytree(ddp_run["ckpt4"], out / "checkpoints" / "step-00000004")
    spec = out / "train_spec.json"

    def node1() -> subprocess.CompletedProcess:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                json.loads(spec.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
        cmd = [sys.executable, "-m", "torch.distributed.run", *train_mod.torchrun_args(cfg, node_rank=1),
               "-m", "tasks.train.entry", str(spec)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    logs = []
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(node1)
        res = train_mod.run_train(cfg, MODEL, tokens, ws, log=logs.append)
        node = other.result()
    assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    assert any("on 2 x cpu (FSDP, 1 CPU thread(s) per process)" in m for m in logs), logs
    assert any("resuming" in m and "(step 4," in m for m in logs), logs
    assert res.counts["steps"] == 6
    assert tracking.client(ws).get_run(res.info["run_id"]).data.tags["neo.world_size"] == "2"
    got = _losses(ws, res.info["run_id"])
    for s in (5, 6):
        assert got[s] == pytest.approx(ref["losses"][s], **CLOSE), s
    _assert_close_tensors(load_file(f"{res.info['model_dir']}/model.safetensors"), ref["weights"],
                          rtol=1e-4, atol=1e-5)
