"""Register stage: log the trained model into its training run, register it, run the promotion gate.

Everything lands in the MLflow run the train stage opened: params (the whole config, secrets
redacted), dataset lineage (`log_inputs` per stage, the fingerprint as digest and tag, manifests as
artifacts), code versions and the Prefect flow run as tags, the eval report and samples, and the model
as a pyfunc text generator plus its Hugging Face files. The new version is tagged with its
fingerprints and metrics.

The gate compares like with like: the current champion is re-scored on the candidate's validation
text (each model with its own tokenizer, bits-per-byte being tokenizer-independent) and the candidate
takes `champion` only if it is better by more than `registry.margin`; otherwise it is `challenger`.
Re-running (a retry, a lost cache) never registers the same training twice: a version is looked up
by its fingerprint tag first.
"""
from __future__ import annotations

import math
import warnings
import tempfile
from pathlib import Path

import numpy as np

from tasks.register import registry
from tasks.core import tracking
from tasks.core.charts import CHART_FILE
from tasks.tokenize.bpe import load_tokenizer
from tasks.core.train_config import RegistryConfig
from tasks.evaluate.evals.scoring import rolling_nll
from tasks.core.protocol import (MANIFEST, Computed, Stage, StageResult, file_entry, lineage_of, run_stage,
                                 sha256_file, stable_hash, stage_dir, write_json_atomic)
from tasks.tokenize.rows import read_rows

STAGE = Stage("register", version=2, module=__name__, section="registry", inputs=("evaluate",),
              info_keys=("model_name", "version", "alias", "run_id", "metric", "gate"))
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
NEO_MODEL_DIR = Path(__file__).resolve().parents[2] / "neo_model"
PIP_REQUIREMENTS = ["torch==2.13.0", "tokenizers", "safetensors", "numpy", "pandas"]


def plan(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult],
         params: dict[str, str], workspace: str) -> tuple[str, Path]:
    # The evaluation's fingerprint already covers every stage before it; the lineage list only says
    # where the tokens and the training are, so the same training registered from the full pipeline or
    # from existing token shards (train-eval-register) is the same registration.
    return STAGE.plan(cfg, [upstream.fingerprint, stable_hash(params)], workspace)


# ---------------------------------------------------------------------------- the gate


def validation_documents(tokens_dir: str | Path, max_bytes: int) -> list[str]:
    """The candidate's validation text, decoded from its token rows and split at `<|endoftext|>`."""
    rows, _ = read_rows(tokens_dir, "val")
    tok = load_tokenizer(tokens_dir)
    eos = tok.token_to_id("<|endoftext|>")
    stream = np.concatenate([rows[:1, 0], rows[:, 1:].ravel()]).astype(np.int64)
    cuts = np.flatnonzero(stream == eos)
    docs, total = [], 0
    for a, b in zip(cuts[:-1], cuts[1:]):
        text = tok.decode(stream[a + 1:b].tolist())
        if text:
            docs.append(text)
            total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not docs:
        raise ValueError(f"{tokens_dir}: no complete validation document for the promotion gate")
    return docs


def text_bpb(model_dir: str | Path, docs: list[str]) -> float:
    """Bits per byte of `docs` under the model in `model_dir` (HF files + tokenizer.json)."""
    from tokenizers import Tokenizer

    from neo_model import GPTNeo

    model = GPTNeo.from_pretrained(model_dir)
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    nll = sum(rolling_nll(model, tok.encode(d).ids, model.config.eos_token_id) for d in docs)
    return nll / math.log(2) / sum(len(d.encode("utf-8")) for d in docs)


def compare(model_dir: str, champ_dir: str, tokens_dir: str, metrics: dict, max_bytes: int
            ) -> tuple[float, float, str]:
    """(candidate bpb, champion bpb, what both were measured on). With the candidate's tokenizer the
    champion is scored on exactly the evaluate stage's validation rows, so the candidate's figure is
    its `val_bpb`, the one figure on the version page; with another tokenizer both models score the
    candidate's validation text (the first `max_bytes`), each with its own tokenizer."""
    tokens_json = Path(tokens_dir) / "tokenizer.json"
    if sha256_file(tokens_json) == sha256_file(Path(champ_dir) / "tokenizer.json"):
        from neo_model import GPTNeo
        from tasks.evaluate.stage import model_nll

        rows, n_bytes = read_rows(tokens_dir, "val")
        n_rows = int(metrics["val_tokens"]) // (rows.shape[1] - 1)  # the rows evaluate scored
        nll = model_nll(GPTNeo.from_pretrained(champ_dir), rows[:n_rows], 16, None)
        theirs = float(nll.sum()) / math.log(2) / float(n_bytes[:n_rows].sum())
        return metrics["val_bpb"], theirs, (
            f"the candidate's validation split as the evaluate stage scored it ({int(metrics['val_tokens']):,} "
            f"tokens, {int(metrics['val_bytes']):,} bytes, rows of {rows.shape[1] - 1} tokens), same tokenizer")
    docs = validation_documents(tokens_dir, max_bytes)
    n = sum(len(d.encode("utf-8")) for d in docs)
    return text_bpb(model_dir, docs), text_bpb(champ_dir, docs), (
        f"{n:,} bytes ({len(docs)} documents) of the candidate's validation text, each model with its "
        f"own tokenizer (the champion's differs)")


def gate(cfg: RegistryConfig, c, candidate: str, model_dir: str, tokens_dir: str, metrics: dict) -> dict:
    """Decide champion or challenger for `candidate`; records the decision on the version. A model
    that does not beat the unigram baseline on its own validation targets is never champion."""
    champion = registry.alias_version(c, cfg.model_name, registry.CHAMPION)
    if champion == candidate:  # a rerun after this version was already promoted
        return {"alias": registry.CHAMPION, "reason": "already champion", "champion_before": champion}
    ours, base = metrics["val_bpb"], metrics["unigram_val_bpb"]
    if not ours < base:
        reason = (f"val bpb {ours:.4f} does not beat the unigram baseline {base:.4f} on the same "
                  f"{metrics.get('val_tokens', 0):.0f} validation tokens: not promoted")
        c.set_model_version_tag(cfg.model_name, candidate, "gate.baseline", "not beaten")
        registry.mark_challenger(c, cfg.model_name, candidate, reason)
        return {"alias": registry.CHALLENGER, "reason": reason, "champion_before": champion,
                "candidate_val_bpb": ours, "unigram_val_bpb": base}
    c.set_model_version_tag(cfg.model_name, candidate, "gate.baseline",
                            f"beaten: {ours:.4f} < unigram {base:.4f} bits/byte")
    if champion is None:
        registry.promote(c, cfg.model_name, candidate, "first model")
        return {"alias": registry.CHAMPION, "reason": "first model", "champion_before": None}
    run_id = c.get_model_version(cfg.model_name, champion).run_id
    with tempfile.TemporaryDirectory() as tmp:
        import mlflow

        champ_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="hf_model", dst_path=tmp,
                                                        tracking_uri=c.tracking_uri)
        ours, theirs, basis = compare(model_dir, champ_dir, tokens_dir, metrics, cfg.gate_max_bytes)
    decision = {"candidate_bpb": ours, "champion_bpb": theirs, "champion_before": champion,
                "margin": cfg.margin, "measured_on": basis}
    for k in ("candidate_bpb", "champion_bpb"):
        c.set_model_version_tag(cfg.model_name, candidate, f"gate.{k}", f"{decision[k]:.6f}")
    c.set_model_version_tag(cfg.model_name, candidate, "gate.measured_on", basis)
    c.set_model_version_tag(cfg.model_name, candidate, "gate.champion_version", str(champion))
    if ours < theirs - cfg.margin:
        reason = f"bpb {ours:.4f} beats champion v{champion} {theirs:.4f} by more than {cfg.margin}"
        registry.promote(c, cfg.model_name, candidate, reason)
        return {**decision, "alias": registry.CHAMPION, "reason": reason}
    reason = f"bpb {ours:.4f} does not beat champion v{champion} {theirs:.4f} by more than {cfg.margin}"
    registry.mark_challenger(c, cfg.model_name, candidate, reason)
    return {**decision, "alias": registry.CHALLENGER, "reason": reason}


# ---------------------------------------------------------------------------- logging and registering


def _existing_version(c, cfg: RegistryConfig, fp: str):
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name = '{cfg.model_name}' and tags.neo_fingerprint = '{fp}'")
    except MlflowException:
        return None
    return found[0] if found else None


def lineage_dirs(results: list[StageResult], workspace: str) -> dict[str, tuple[str, Path]]:
    """Stage -> (fingerprint, directory) for the whole chain behind `results` (their manifests'
    lineage plus themselves): a stage not among `results` is at `<workspace>/<stage>/<fp>`."""
    given = {r.stage: Path(r.path) for r in results}
    return {stage: (fp, given.get(stage) or stage_dir(workspace, stage, fp))
            for stage, fp in lineage_of(results).items()}


def _log_lineage(c, run_id: str, chain: dict[str, tuple[str, Path]]) -> None:
    """One dataset input per stage output (digest = fingerprint prefix, MLflow caps it at 36 chars),
    and each stage's manifest, report chart and code version where this host has it."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=stage, digest=fp[:36], source_type="local", source=path.resolve().as_uri()),
                           tags=[InputTag("mlflow.data.context", stage), InputTag("neo.fingerprint", fp)])
              for stage, (fp, path) in chain.items()]
    c.log_inputs(run_id, datasets=inputs)
    for stage, (_, path) in chain.items():
        if (path / MANIFEST).is_file():
            c.log_artifact(run_id, str(path / MANIFEST), artifact_path=f"lineage/{stage}")
        if (path / CHART_FILE).is_file():  # a data stage's report chart (tasks/core/stage_report.py)
            c.log_artifact(run_id, str(path / CHART_FILE), artifact_path=f"lineage/{stage}")
            manifest = json.loads((path / MANIFEST).read_text())
            if "code_version" in manifest:
                c.set_tag(run_id, f"neo.code_version.{stage}", manifest["code_version"])


def _log_model(run_id: str, model_dir: str, workspace: str) -> str:
    import mlflow

    from tasks.register.pyfunc_model import signature  # imports MLflow: only here

    with tracking.fluent(workspace), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is explicit (params schema included): MLflow's advice to add an input
        # example only adds noise to `neo run`.
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_FILE),
                                       artifacts={"model": model_dir}, code_paths=[str(NEO_MODEL_DIR)],
                                       pip_requirements=PIP_REQUIREMENTS, signature=signature())
        mlflow.log_artifacts(model_dir, artifact_path="hf_model")
    return info.model_uri


def _register_new(c, cfg, fp, upstream, lineage, params, workspace, run_tags) -> str:
    import mlflow
    from mlflow.entities import Param

    run_id, model_dir = upstream.info["run_id"], upstream.info["model_dir"]
    logged = set(c.get_run(run_id).data.params)
    c.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items() if k not in logged])
    for k, v in run_tags.items():
        c.set_tag(run_id, k, v)
    chain = lineage_dirs([*lineage, upstream], workspace)
    _log_lineage(c, run_id, chain)
    for key in ("samples_path", "report_path"):
        if upstream.info.get(key):
            c.log_artifact(run_id, upstream.info[key], artifact_path="eval")
    model_uri = _log_model(run_id, model_dir, workspace)
    metrics = upstream.info["metrics"]
    train = next((r for r in lineage if r.stage == "train"), None)
    tags = {"neo_fingerprint": fp, "neo_run_id": run_id, cfg.metric: str(metrics.get(cfg.metric)),
            **{f"neo.fp.{stage}": fp for stage, (fp, _) in chain.items()}}
    with tracking.fluent(workspace), tracking.quiet():
        mv = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    steps = train.counts.get("steps") if train else "?"
    c.update_model_version(cfg.model_name, mv.version, description=(
        f"GPT-Neo trained {steps} steps. Validation bits-per-byte {metrics['val_bpb']:.4f}, measured by "
        f"the evaluate stage on the held-out split ({int(metrics.get('val_tokens', 0)):,} tokens, "
        f"{int(metrics.get('val_bytes', 0)):,} bytes); unigram baseline {metrics['unigram_val_bpb']:.4f} "
        f"on the same targets; perplexity {metrics['val_ppl']:.2f}. "
        f"Training run {run_id}; register fingerprint {fp}."))
    return str(mv.version)


def run_register(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult],
                 params: dict[str, str], workspace: str, run_tags: dict[str, str] | None = None) -> StageResult:
    """Log the evaluated model into its training's MLflow run, register it (once per fingerprint) and
    let the gate alias it; `lineage` must hold the token stage's result (the gate scores its text)."""
    planned = plan(cfg, upstream, lineage, params, workspace)
    return run_stage(STAGE, planned, config=cfg, inputs=[upstream.fingerprint, stable_hash(params)],
                     upstream=[*lineage, upstream],
                     compute=lambda out: _register(cfg, upstream, lineage, params, workspace, run_tags or {},
                                                   planned[0], out))


def _register(cfg: RegistryConfig, upstream: StageResult, lineage: list[StageResult], params: dict[str, str],
              workspace: str, run_tags: dict[str, str], fp: str, out: Path) -> Computed:
    metrics = upstream.info["metrics"]
    if cfg.metric not in metrics:
        raise ValueError(f"registry.metric {cfg.metric!r} is not an evaluation metric "
                         f"(known: {', '.join(sorted(metrics))})")
    tokens = next((r for r in lineage if r.stage == "tokenize"), None)
    if tokens is None:
        raise ValueError("register needs the tokenize stage's result in its lineage (for the gate)")
    c = tracking.client(workspace)
    existing = _existing_version(c, cfg, fp)
    version = str(existing.version) if existing is not None else \
        _register_new(c, cfg, fp, upstream, lineage, params, workspace, run_tags)
    decision = gate(cfg, c, version, upstream.info["model_dir"], tokens.path, metrics)
    record = {"model_name": cfg.model_name, "version": version, "alias": decision["alias"],
              "run_id": upstream.info["run_id"], "metric": {cfg.metric: metrics[cfg.metric]}, "gate": decision}
    write_json_atomic(out / "registration.json", record)
    return Computed({"registered": int(existing is None)}, [file_entry(out / "registration.json", out)], record)


def model_version_url(cfg: RegistryConfig, workspace: str, version: str) -> str:
    uri = tracking.tracking_uri(workspace)
    base = uri.rstrip("/") if uri.startswith("http") else cfg.ui_url.rstrip("/")
    return f"{base}/#/models/{cfg.model_name}/versions/{version}"


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report lines of a register result."""
    i = result.info
    return (f"registered {i['model_name']} version {i['version']} as @{i['alias']}: {i['gate']['reason']}",
            [f"- model: `{i['model_name']}` version {i['version']} alias `@{i['alias']}`",
             f"- gate: {i['gate']['reason']}"])
