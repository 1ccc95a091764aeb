"""CPU threads follow the CPUs a process may really use (affinity mask, cgroup quota), split among a
run's processes: a training subprocess started under a 1-CPU mask trains with 1 thread, the data
stages' worker pools shrink to the mask, and a cgroup quota caps both."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from neo_model import GPTNeoConfig
from registry_helpers import word_tokens

from tasks.core import cpus
from tasks.core.train_config import TrainConfig
from tasks.train.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity masks")


def _one_cpu():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _python(code: str, one_cpu: bool) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         preexec_fn=_one_cpu if one_cpu else None)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    assert cpus.cgroup_quota(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_quota(tmp_path) is None
    assert cpus.threads_per_process(2, cpus=2) == 1 and cpus.threads_per_process(4, cpus=2) == 1
    assert cpus.threads_per_process(1, cpus=3) == 3


def test_a_one_cpu_mask_gives_one_thread_to_evaluation_and_one_data_worker():
    code = ("import json, torch; from tasks.core import cpus, units; "
            "n = cpus.set_torch_threads(); pids = units.pool_map(__import__('os').getpid, [()] * 4, None); "
            "print(json.dumps([cpus.available_cpus(), n, torch.get_num_threads(), len(set(pids))]))")
    masked = json.loads(_python(code, one_cpu=True))
    assert masked == [1, 1, 1, 1]  # one worker: the units ran in the calling process
    free = json.loads(_python(code, one_cpu=False))
    assert free[0] == len(os.sched_getaffinity(0)) and free[1] == free[2] == free[0]


def test_training_subprocess_under_a_one_cpu_mask_trains_with_one_thread(tmp_path_factory):
    tokens = word_tokens(tmp_path_factory, seed=2, n_docs=40, fp_char="c")
    mcfg = GPTNeoConfig.from_preset("debug", vocab_size=tokens.info["vocab_size"], max_position_embeddings=64,
                                    eos_token_id=tokens.info["eos_id"], bos_token_id=tokens.info["eos_id"])
    out = tmp_path_factory.mktemp("run")
    spec = TrainSpec(train=TrainConfig(max_steps=2, batch_size=4, device="cpu", log_every=1), model=mcfg.to_hf_dict(),
                     tokens_dir=tokens.path, out_dir=str(out)).write(out / "spec.json")
    code = f"import sys; from tasks.train.entry import main; sys.exit(main([{str(spec)!r}]))"
    assert "(single process, 1 CPU thread(s) per process)" in _python(code, one_cpu=True)
    for p in (out / "checkpoints", out / "model"):  # train again from scratch, without the mask
        shutil.rmtree(p, ignore_errors=True)
    threads = len(os.sched_getaffinity(0))
    assert f"(single process, {threads} CPU thread(s) per process)" in _python(code, one_cpu=False)
