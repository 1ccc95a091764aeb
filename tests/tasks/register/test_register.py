"""Register stage and registry operations: the gate in all branches, lineage, idempotence, rollback."""
import shutil

import pytest
import torch
from registry_helpers import TEXTS, evaluation, make_tokens, trained, word_tokens

from neo_model import GPTNeo
from tasks.register import registry
from tasks.core import tracking
from tasks.core.train_config import EvalConfig, RegistryConfig
from tasks.evaluate.stage import validation_metrics
from tasks.register.stage import run_register, text_bpb, validation_documents
from tasks.core.protocol import StageResult


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, ws) -> StageResult:
    return make_tokens(tmp_path_factory.mktemp("dedup"), ws)


def _uniform(ws, result: StageResult) -> StageResult:
    """A copy of a trained run whose model predicts the uniform distribution (all-zero embeddings)."""
    model = GPTNeo.from_pretrained(result.info["model_dir"])
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    d = ws / "uniform-model"
    model.save_pretrained(d)
    shutil.copy2(f"{result.info['model_dir']}/tokenizer.json", d / "tokenizer.json")
    c = tracking.client(ws)
    run_id = c.create_run(tracking.experiment_id(c, "neo-pipeline", ws)).info.run_id
    return result.model_copy(update={"fingerprint": "u" * 16,
                                     "info": {**result.info, "model_dir": str(d), "run_id": run_id}})


def test_validation_documents_are_the_val_text(tokens):
    docs = validation_documents(tokens.path, max_bytes=10**9)
    assert len(docs) >= tokens.counts["val_docs"] - 2  # documents in the dropped tail may be missing
    assert all(d in TEXTS for d in docs), "each decoded document is exactly a source document"


def test_gate_all_branches_and_rollback(ws, tokens):
    name = "neo-gate"
    cfg = RegistryConfig(model_name=name)
    params = {"train.lr": "0.003", "corpus.api_key": "***"}
    short, longer = trained(ws, tokens, 15), trained(ws, tokens, 60)
    uniform = _uniform(ws, short)
    docs = validation_documents(tokens.path, cfg.gate_max_bytes)
    bpb = {k: text_bpb(r.info["model_dir"], docs) for k, r in
           {"short": short, "longer": longer, "uniform": uniform}.items()}
    assert bpb["longer"] < bpb["short"] < bpb["uniform"]

    def reg(result, tag, registry_cfg=cfg):
        return run_register(registry_cfg, evaluation(ws, result, tag, bpb[tag.rstrip("2")], tokens),
                            [tokens, result], params, str(ws), run_tags={"prefect.flow_run_id": f"fr-{tag}"})

    first = reg(short, "short")  # no champion yet
    assert (first.info["version"], first.info["alias"]) == ("1", "champion")
    assert first.info["gate"]["reason"] == "first model"
    worse = reg(uniform, "uniform")  # re-scored champion wins
    assert (worse.info["version"], worse.info["alias"]) == ("2", "challenger")
    # Same tokenizer: the champion is scored on exactly the rows the evaluate stage scored, so the
    # candidate's gate figure is its val_bpb (one figure on the version page).
    rows_bpb = validation_metrics(EvalConfig(), GPTNeo.from_pretrained(short.info["model_dir"]), tokens.path)[0]["val_bpb"]
    assert worse.info["gate"]["champion_bpb"] == pytest.approx(rows_bpb, rel=1e-6)
    assert worse.info["gate"]["candidate_bpb"] == pytest.approx(bpb["uniform"], rel=1e-6)
    assert worse.info["gate"]["measured_on"].startswith("the candidate's validation split as the evaluate stage")
    within = reg(longer, "longer", RegistryConfig(model_name=name, margin=10.0))  # better, not by the margin
    assert (within.info["version"], within.info["alias"]) == ("3", "challenger")
    better = reg(longer, "longer2")  # same model, new registration, default margin
    assert (better.info["version"], better.info["alias"]) == ("4", "champion")

    c = tracking.client(ws)
    assert registry.alias_version(c, name, "champion") == "4"
    assert registry.alias_version(c, name, "previous-champion") == "1"
    mv = c.get_model_version(name, "4")
    assert mv.tags["gate.decision"] == "champion" and float(mv.tags["gate.champion_bpb"]) == pytest.approx(rows_bpb)
    assert mv.tags["neo.fp.tokenize"] == tokens.fingerprint and "bits-per-byte" in mv.description
    assert c.get_model_version(name, "2").tags["gate.decision"] == "challenger"
    run = c.get_run(short.info["run_id"])
    assert run.data.params == params
    assert run.data.tags["prefect.flow_run_id"] == "fr-short"
    # the whole chain: the token stage's manifest names the (here hand-made) dedup output it read
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"dedup", "tokenize", "train", "evaluate"}
    assert mv.tags["neo.fp.dedup"] == tokens.lineage["dedup"] == "d" * 16
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} >= {tokens.fingerprint, short.fingerprint}
    assert {a.path for a in c.list_artifacts(short.info["run_id"])} >= {"eval", "hf_model", "lineage"}

    rows = registry.list_versions(c, name)
    assert [(r.version, r.aliases) for r in rows] == [
        ("4", ["champion"]), ("3", ["challenger"]), ("2", []), ("1", ["previous-champion"])]
    assert registry.rollback(c, name) == ("4", "1")
    assert registry.alias_version(c, name, "champion") == "1"
    assert registry.alias_version(c, name, "previous-champion") is None
    assert c.get_model_version(name, "4").tags["gate.decision"] == "rolled-back"
    with pytest.raises(ValueError, match="no 'previous-champion'"):
        registry.rollback(c, name)
    assert registry.promote(c, name, "3") == "1"
    assert registry.alias_version(c, name, "challenger") is None  # the promoted challenger loses it

    # Losing the stage directory (or a retry after a partial failure) must not register twice.
    shutil.rmtree(better.path)
    again = reg(longer, "longer2")
    assert again.info["version"] == "4" and again.counts["registered"] == 0
    assert len(c.search_model_versions(f"name = '{name}'")) == 4


def test_a_model_that_does_not_beat_the_unigram_baseline_is_never_champion(ws, tokens):
    """Not even as the first model: registered, alias `challenger`, the reason on the version."""
    name = "neo-baseline-gate"
    short = trained(ws, tokens, 15)
    c = tracking.client(ws)

    def reg(tag, bpb):
        return run_register(RegistryConfig(model_name=name), evaluation(ws, short, tag, bpb, tokens), [tokens, short],
                            {}, str(ws))

    lost = reg("lost", 3.2)  # the helper's unigram baseline is 3.0 bits/byte
    assert (lost.info["version"], lost.info["alias"]) == ("1", "challenger")
    assert registry.alias_version(c, name, "champion") is None
    mv = c.get_model_version(name, "1")
    assert mv.tags["gate.baseline"] == "not beaten" and mv.tags["gate.decision"] == "challenger"
    assert "does not beat the unigram baseline 3.0000" in mv.tags["gate.reason"]
    won = reg("won", 2.5)  # beats the baseline: the first champion
    assert (won.info["version"], won.info["alias"]) == ("2", "champion")
    assert won.info["gate"]["reason"] == "first model"
    assert c.get_model_version(name, "2").tags["gate.baseline"] == "beaten: 2.5000 < unigram 3.0000 bits/byte"


def test_gate_against_a_champion_with_another_tokenizer_scores_text(ws, tokens, tmp_path_factory):
    """A champion trained with another tokenizer cannot read the candidate's token rows: both models
    score the candidate's validation text, each with its own tokenizer, and the version says so."""
    name = "neo-other-tokenizer"
    other = word_tokens(tmp_path_factory, seed=3, n_docs=60, fp_char="o")
    champ, cand = trained(ws, other, 15), trained(ws, tokens, 16)
    first = run_register(RegistryConfig(model_name=name), evaluation(ws, champ, "otok", 1.0, other),
                         [other, champ], {}, str(ws))
    assert first.info["alias"] == "champion"
    second = run_register(RegistryConfig(model_name=name), evaluation(ws, cand, "cand", 1.5, tokens),
                          [tokens, cand], {}, str(ws))
    g = second.info["gate"]
    docs = validation_documents(tokens.path, RegistryConfig().gate_max_bytes)
    assert g["candidate_bpb"] == pytest.approx(text_bpb(cand.info["model_dir"], docs), rel=1e-6)
    assert g["champion_bpb"] == pytest.approx(text_bpb(champ.info["model_dir"], docs), rel=1e-6)
    n = sum(len(d.encode()) for d in docs)
    assert g["measured_on"] == (f"{n:,} bytes ({len(docs)} documents) of the candidate's validation text, "
                                f"each model with its own tokenizer (the champion's differs)")
    mv = tracking.client(ws).get_model_version(name, second.info["version"])
    assert mv.tags["gate.measured_on"] == g["measured_on"]
    assert "measured by the evaluate stage on the held-out split" in mv.description
