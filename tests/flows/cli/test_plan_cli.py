"""`neo plan` as a user types it: the table carries the numbers of the pure function, --json is that
function's output, and bad input is one `error:` line with exit 2."""
import json

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from flows.cli.plan import LAYOUTS, make_plan, parse_number
from neo_model import GPTNeoConfig, sizing

ARGS = ["-c", "1.3b", "--gpus", "8", "--gpu-mem", "80", "--tokens", "380e9"]


def _neo(*args: str):
    result = CliRunner().invoke(app, ["plan", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def plan_1_3b():
    return make_plan("1.3b", [], gpus="8", gpu_mem="80", tokens="380e9")


def test_table_shows_the_pure_functions_numbers(plan_1_3b):
    code, out = _neo(*ARGS)
    assert code == 0, out
    p = plan_1_3b
    assert p["parameters"]["total"] == 1_315_575_808
    c = GPTNeoConfig.from_preset("1.3b")
    assert p["flops_per_token"] == sizing.flops_per_token(c, 2048)
    for number in (p["parameters"]["total"], p["parameters"]["non_embedding"], p["flops_per_token"]):
        assert f"{number:,}" in out
    assert p["job"]["micro_batch"] == 8 and p["job"]["accum"] == 8  # configs/1.3b.yaml over 8 GPUs
    for col in LAYOUTS:
        strategy, ckpt = LAYOUTS[col]
        m = sizing.training_memory(c, 8, 2048, strategy=strategy, gpus=8, checkpointing=ckpt, accum=8)
        assert p["memory"][col]["total"] == m.total
    totals = next(line for line in out.splitlines() if line.startswith("total (peak)")).split()[2:]
    assert totals == [f"{p['memory'][col]['total'] / 2**30:,.2f}" for col in LAYOUTS]
    fits = next(line for line in out.splitlines() if line.startswith("largest micro-batch")).split()[4:]
    assert fits == [f"{p['max_micro_batch'][col]['any']:,}" for col in LAYOUTS]
    s = p["throughput"]
    assert s["tokens_per_s"] == pytest.approx(8 * 0.4 * 989e12 / p["flops_per_token"])
    assert s["days"] == pytest.approx(380e9 / s["tokens_per_s"] / 86400)
    assert f"{s['tokens_per_s']:,.0f} tokens/s" in out and f"{s['days']:,.1f} days for 380B tokens" in out


def test_json_is_the_plan(plan_1_3b):
    code, out = _neo(*ARGS, "--json")
    assert code == 0, out
    assert json.loads(out) == json.loads(json.dumps(plan_1_3b))


def test_options_and_overrides_reach_the_plan():
    code, out = _neo("-c", "debug", "--gpus", "2", "--gpu-mem", "0.5", "--mfu", "0.5", "--peak-tflops", "312",
                     "--tokens", "1.5B", "--set", "model.overrides.num_layers=3", "--json")
    assert code == 0, out
    p = json.loads(out)
    assert p["model"]["num_layers"] == 3 and p["job"]["gpus"] == 2 and p["job"]["rows_per_gpu"] == 4
    assert p["throughput"]["tokens"] == 1.5e9 and p["throughput"]["peak_flops"] == 312e12
    assert p["job"]["budget_bytes"] == int(0.5 * 0.9 * 2**30)


@pytest.mark.parametrize("args, message", [
    (("-c", "no-such-preset"), "error: config preset 'no-such-preset' not found"),
    (("-c", "1.3b", "--gpus", "-1"), "error: --gpus must be > 0, got '-1'"),
    (("-c", "1.3b", "--gpus", "0"), "error: --gpus must be > 0, got '0'"),
    (("-c", "1.3b", "--gpus", "2.5"), "error: --gpus: '2.5' is not a whole number"),
    (("-c", "1.3b", "--tokens", "lots"), "error: --tokens: 'lots' is not a number"),
    (("-c", "1.3b", "--mfu", "1.5"), "error: --mfu must be > 0 and <= 1, got '1.5'"),
    (("-c", "1.3b", "--gpu-mem", "x"), "error: --gpu-mem: 'x' is not a number"),
    (("-c", "1.3b", "--gpus", "7"), "error: the batch of 512 rows does not split over 7 processes"),
    (("-c", "1.3b", "--set", "model.overrides.num_layers=x"), "error: model: "),
    (("-c", "1.3b", "--set", "train.nope=1"), "error: invalid config: train.nope"),
])
def test_bad_input_is_one_error_line_and_exit_2(args, message):
    code, out = _neo(*args)
    assert code == 2, out
    assert out.startswith(message) and len(out.strip().splitlines()) == 1 and "Traceback" not in out


@pytest.mark.parametrize("text, value", [("380e9", 380e9), ("380B", 380e9), ("1.5T", 1.5e12), ("2_000", 2000.0),
                                         ("300m", 300e6), (".4", 0.4)])
def test_parse_number(text, value):
    assert parse_number(text, "--x") == value
