"""`neo` command line: run the pipeline, verify outputs, manage registered models, export to HF.

Configuration is validated and the embedded Prefect/MLflow locations are set before Prefect is
imported, so a bad `--set` fails in milliseconds, naming the key, and no work starts.
"""
from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from tasks.core.config import ConfigError, default_workspace, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="neo-pipeline: pre-train GPT-Neo with Prefect and MLflow.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _download_progress():
    """A progress bar (bytes and documents per second) while the download stage streams sources."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    import tasks.download.stage as dl

    bar = Progress(TextColumn("[bold]download"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), TextColumn("{task.fields[rate]}"))
    state: dict = {}

    def hook(p: dict) -> None:
        if "task" not in state:
            bar.start()
            state["task"] = bar.add_task("download", total=100, rate="")
        bar.update(state["task"], completed=100 * p["fraction"],
                   rate=f"{p['docs']:,.0f} docs, {p['docs_per_s']:,.0f} docs/s, "
                        f"{p['read_bytes_per_s'] / 1e6:,.1f} MB/s")
        if p["fraction"] >= 1:
            bar.stop()

    dl.PROGRESS_HOOKS.append(hook)
    try:
        yield
    finally:
        dl.PROGRESS_HOOKS.remove(hook)
        bar.stop()


_CONFIG = typer.Option("tiny", "-c", "--config", help="Preset name in configs/ or a YAML path.")
_SET = typer.Option([], "--set", help="Override: section.key=value (repeatable).")
_WORKSPACE = typer.Option(
    None, "-w", "--workspace", help="Workspace root (default $NEO_HOME or ./.neo), or an fsspec "
    "URL on shared storage such as s3://bucket/prefix (computed in a local copy under $NEO_CACHE_DIR).")
_WAIT = typer.Option(False, "--wait", help="If another neo run holds the workspace, wait for it.")


@contextlib.contextmanager
def _session(config: str, set_: list[str], workspace: Optional[str], wait: bool, flows: str,
             check_sources: bool = True):
    """Everything checked before any work (config, local sources), the workspace held (one run at a
    time), the embedded runtime started while the `flows` module is imported; yields (config, local
    workspace, shared workspace URL or None)."""
    from flows.cli.lock import WorkspaceBusy, workspace_lock
    from tasks.core import storage
    from tasks.download.sources import check_local_sources

    try:
        cfg = load_config(config, set_)
        if check_sources:
            check_local_sources(cfg.corpus)  # a mistyped path fails here, before any server starts
        shared = workspace if workspace and storage.is_remote(workspace) else None
        ws = Path(storage.attach(shared)) if shared else Path(workspace or default_workspace()).resolve()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(workspace_lock(ws, wait, echo=typer.echo))
        except WorkspaceBusy as exc:
            _fail(str(exc))
        from flows.cli.runtime import configure, prestart, shield_embedded_server

        configure(ws)
        typer.echo(f"neo: config {cfg.name!r}, workspace {shared + f' (local copy {ws})' if shared else ws}")
        shield_embedded_server()
        # Prefect's engine turns SIGTERM into a Crashed run, then re-sends the signal to this
        # handler: exiting normally (not by the signal) runs the atexit hook that stops the
        # embedded server, which SIGTERM to the group no longer reaches (shield_embedded_server).
        signal.signal(signal.SIGTERM, _terminated)
        try:
            ready, _ = prestart(ws), importlib.import_module(flows)  # the server boots while we import
            ready()
            yield cfg, ws, shared
        except KeyboardInterrupt:
            _terminated(signal.SIGINT, None)
        except Exception as exc:  # noqa: BLE001 - a stage failed; Prefect logged its traceback above
            if isinstance(exc, (typer.Exit, typer.Abort)):  # the CLI's own exits (`_fail`: exit 2)
                raise
            typer.secho(f"error: {type(exc).__name__}: {exc}\n(traceback in the log above; a rerun reuses "
                        "every stage that finished)", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)


def _terminated(signum: int, frame) -> None:
    typer.secho(f"neo: stopped by {signal.Signals(signum).name}; the Prefect run is marked Crashed and a "
                "rerun resumes from the newest checkpoint", fg=typer.colors.RED, err=True)
    sys.exit(128 + signum)


def _summary(stages: dict, ws: Path) -> None:
    """The closing summary of a run that registered a model: version, alias, metrics, where things are."""
    from flows.cli.runtime import ui_instructions

    registered, m = stages["register"].info, stages["evaluate"].info["metrics"]
    reused = [name for name, r in stages.items() if r.reused]
    typer.echo("\n".join([
        "", "== neo-pipeline summary ==",
        f"registered model : {registered['model_name']} version {registered['version']} (@{registered['alias']})",
        f"validation       : perplexity {m['val_ppl']:.2f}, bits-per-byte {m['val_bpb']:.4f} "
        f"(unigram baseline {m['unigram_val_bpb']:.4f})",
        f"MLflow run       : {registered['run_id']}", f"workspace        : {ws}",
        *(f"stage {n:<11}: {r.path}" for n, r in stages.items()),
        *([f"reused outputs   : {', '.join(reused)}"] if reused else []), *ui_instructions(ws)]))


@app.command()
def run(config: str = _CONFIG, set_: list[str] = _SET, workspace: Optional[str] = _WORKSPACE,
        wait: bool = _WAIT) -> None:
    """Run the whole pipeline: download, clean, dedup, tokenize, train, evaluate, register."""
    with _session(config, set_, workspace, wait, "flows.pipeline") as (cfg, ws, shared):
        from flows.pipeline import neo_pipeline

        with _download_progress():
            s = neo_pipeline(config=cfg, workspace=shared or str(ws))
        _summary(s.stages, ws)


@app.command()
def data(config: str = _CONFIG, set_: list[str] = _SET, workspace: Optional[str] = _WORKSPACE,
         wait: bool = _WAIT) -> None:
    """Prepare training data only (download, clean, dedup, tokenize); prints the token directory."""
    with _session(config, set_, workspace, wait, "flows.data") as (cfg, ws, shared):
        from flows.data import neo_data
        from tasks.core import storage

        with _download_progress():
            stages = neo_data(cfg, shared or str(ws))
        tokens = stages["tokenize"]
        for name, r in stages.items():
            typer.echo(f"stage {name:<11}: {r.path}{'  (reused)' if r.reused else ''}")
        c = tokens.counts
        typer.echo(f"tokens           : {storage.shared_path(tokens.path)} ({c['train_rows']:,} train / "
                   f"{c['val_rows']:,} val rows of {tokens.info['seq_len']} tokens)")
        typer.echo(f"next             : neo train {storage.shared_path(tokens.path)} -c {config}"
                   + (f" -w {workspace}" if workspace else ""))


@app.command()
def train(tokens_dir: str = typer.Argument(..., help="A token directory (`neo data` prints it)."),
          config: str = _CONFIG, set_: list[str] = _SET, workspace: Optional[str] = _WORKSPACE,
          wait: bool = _WAIT) -> None:
    """Train, evaluate and register from an existing token directory."""
    from tasks.core.protocol import read_manifest

    with _session(config, set_, workspace, wait, "flows.train", check_sources=False) as (cfg, ws, shared):
        from tasks.core import storage

        local = storage.localize(tokens_dir)
        manifest = read_manifest(local)
        if manifest is None or manifest.get("stage") != "tokenize":
            _fail(f"{tokens_dir}: not a complete tokenize output directory (no manifest, or files changed "
                  "since); `neo data` prints the one to use")
        from flows.train import neo_train_eval_register

        _summary(neo_train_eval_register.with_options(persist_result=False)(tokens_dir, cfg, shared or str(ws)), ws)


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="A model directory, NAME@ALIAS or NAME/VERSION."),
          tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token directory: score its val split."),
          config: str = _CONFIG, set_: list[str] = _SET,
          workspace: Optional[Path] = typer.Option(None, "-w", "--workspace")) -> None:
    """Evaluate a model on a token directory's validation split and the eval tasks (writes nothing)."""
    import tempfile

    from tasks.core.protocol import read_manifest
    from tasks.evaluate.stage import evaluate_model

    try:
        cfg = load_config(config, set_)
    except ConfigError as exc:
        _fail(str(exc))
    if tokens is not None and (read_manifest(tokens) or {}).get("stage") != "tokenize":
        _fail(f"{tokens}: not a complete tokenize output directory (`neo data` prints the one to use)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(model) if Path(model).is_dir() else _download_model(model, workspace, Path(tmp))
        try:
            metrics = evaluate_model(cfg.eval, model_dir, tokens)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
    for name, value in metrics.items():
        typer.echo(f"{name:<28} {value:.6f}")


def _download_model(model: str, workspace: Optional[Path], dest: Path) -> Path:
    """A registered version's Hugging Face files (NAME@ALIAS or NAME/VERSION), downloaded to `dest`."""
    import mlflow

    from tasks.register import registry

    c = _registry_client(workspace)
    with _registry_errors():
        if "@" in model:
            name, alias = model.split("@", 1)
            registry.require_version(c, name)
            mv = c.get_model_version_by_alias(name, alias)
        elif "/" in model:
            name, version = model.split("/", 1)
            registry.require_version(c, name, version)
            mv = c.get_model_version(name, version)
        else:
            _fail(f"{model!r}: expected NAME@ALIAS, NAME/VERSION or a model directory")
    return Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="hf_model", dst_path=str(dest),
                                                    tracking_uri=c.tracking_uri))


@app.command()
def verify(workspace: Optional[Path] = typer.Option(None, "-w", "--workspace")) -> None:
    """Re-hash every stage output against its manifest (full sha256 check)."""
    from tasks.core.protocol import MANIFEST, verify_manifest

    ws = (workspace or default_workspace()).resolve()
    dirs = sorted(p.parent for p in ws.glob(f"*/*/{MANIFEST}"))
    problems = [msg for d in dirs for msg in verify_manifest(d)]
    for msg in problems:
        typer.secho(msg, fg=typer.colors.RED)
    typer.echo(f"verified {len(dirs)} stage directories, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)


def _registry_client(workspace: Optional[Path], required: bool = True):
    """MLflow client on `MLFLOW_TRACKING_URI`, else the workspace's SQLite store, which must exist:
    these verbs read a registry, they never create one (a mistyped -w fails, naming the path)."""
    import os

    from flows.cli.runtime import OFFLINE_DEFAULTS

    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    ws = (workspace or default_workspace()).resolve()
    db = ws / "mlflow" / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not db.is_file():
        if not required:
            return None
        _fail(f"no MLflow registry at {db} (workspace {ws}): run `neo run` there first, pass the "
              "workspace with -w, or set MLFLOW_TRACKING_URI")
    from tasks.core import tracking

    return tracking.client(ws)


@contextlib.contextmanager
def _registry_errors():
    """Expected registry failures as one `error:` line and exit 2 (no traceback)."""
    from mlflow.exceptions import MlflowException

    from tasks.register.registry import RegistryError

    try:
        yield
    except (RegistryError, ValueError) as exc:
        _fail(str(exc))
    except MlflowException as exc:
        _fail(str(exc.message).splitlines()[0])


@app.command()
def models(name: str = typer.Argument(..., help="Registered model name."),
           workspace: Optional[Path] = typer.Option(None, "-w", "--workspace")) -> None:
    """List a registered model's versions with aliases, bits-per-byte and gate decisions."""
    from tasks.register import registry

    with _registry_errors():
        c = _registry_client(workspace)
        registry.require_version(c, name)
        rows = registry.list_versions(c, name)
    if not rows:
        _fail(f"no versions of model {name!r}")
    typer.echo(f"{'version':>7}  {'aliases':<28} {'val_bpb':>8}  decision")
    for r in rows:
        bpb = f"{r.metric:.4f}" if r.metric is not None else "-"
        typer.echo(f"{r.version:>7}  {','.join(r.aliases) or '-':<28} {bpb:>8}  {r.decision or '-'}")


@app.command()
def promote(name: str, version: str, workspace: Optional[Path] = typer.Option(None, "-w", "--workspace"),
            reason: str = typer.Option("promoted by hand", help="Recorded as the version's gate.reason.")) -> None:
    """Make VERSION the champion; the current champion becomes previous-champion."""
    from tasks.register import registry

    with _registry_errors():
        old = registry.promote(_registry_client(workspace), name, version, reason)
    typer.echo(f"{name}: version {version} is @champion" + (f" (was {old}, now @previous-champion)"
                                                           if old and old != version else ""))


@app.command()
def rollback(name: str, workspace: Optional[Path] = typer.Option(None, "-w", "--workspace")) -> None:
    """Give @champion back to @previous-champion."""
    from tasks.register import registry

    with _registry_errors():
        demoted, restored = registry.rollback(_registry_client(workspace), name)
    typer.echo(f"{name}: version {restored} is @champion again (version {demoted} rolled back)")


@app.command("export-hf")
def export_hf(model: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION, or a model directory."),
              out: Path = typer.Argument(..., help="Destination directory."),
              workspace: Optional[Path] = typer.Option(None, "-w", "--workspace")) -> None:
    """Write a Hugging Face directory (GPTNeoForCausalLM + PreTrainedTokenizerFast files)."""
    import tempfile

    from tasks.train.export import copy_export

    with tempfile.TemporaryDirectory() as tmp:
        copy_export(Path(model) if Path(model).is_dir() else _download_model(model, workspace, Path(tmp)), out)
    typer.echo(f"exported to {out.resolve()} (transformers: GPTNeoForCausalLM.from_pretrained, "
               "PreTrainedTokenizerFast.from_pretrained)")


@app.command()
def gc(workspace: Optional[Path] = typer.Option(None, "-w", "--workspace"),
       keep_days: float = typer.Option(7.0, help="Keep anything changed within this many days."),
       include_cache: bool = typer.Option(False, help="Also remove the download cache."),
       yes: bool = typer.Option(False, "--yes", help="Delete; without it, only list (dry run).")) -> None:
    """Remove stage outputs no registered model version or recent run refers to (dry run first)."""
    from flows.cli import gc as retention

    ws = (workspace or default_workspace()).resolve()
    client = _registry_client(ws, required=False)  # no registry yet: nothing is referenced
    refs = retention.referenced_fingerprints(client) if client is not None else set()
    found = retention.collect(ws, refs, keep_days, include_cache)
    for cand in found:
        typer.echo(f"{'remove' if yes else 'would remove'} {cand.path}  ({cand.stage}, "
                   f"{cand.bytes / 1e6:,.1f} MB, {cand.age_days:.1f} days old)")
    total = sum(c.bytes for c in found)
    if yes:
        retention.remove(found)
        typer.echo(f"removed {len(found)} directories, {total / 1e6:,.1f} MB")
    else:
        typer.echo(f"dry run: {len(found)} directories, {total / 1e6:,.1f} MB; rerun with --yes to delete")


from flows.cli.plan import command as plan_command  # noqa: E402 - `neo plan` (its options live there)

app.command("plan")(plan_command)


notify_app = typer.Typer(no_args_is_help=True, help="Notifications through Prefect automations.")
app.add_typer(notify_app, name="notify")


@notify_app.command("setup")
def notify_setup(webhook: str = typer.Option(..., "--webhook", help="URL that receives JSON POSTs.")) -> None:
    """Notify WEBHOOK of failed retrain runs and model promotions (idempotent; needs PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("PREFECT_API_URL is not set: automations live on a Prefect server (e.g. `neo stack up`)")
    from flows.cli import notify

    try:
        done = notify.setup(webhook)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"webhook block {notify.BLOCK_NAME!r} ({done.block_id}) -> {webhook}")
    for name, automation_id in done.automations.items():
        typer.echo(f"automation {name!r}: {automation_id}")


from flows.cli.stack import stack_app  # noqa: E402  (no Prefect import: `neo stack` starts fast)

app.add_typer(stack_app, name="stack")


def main() -> None:
    app(prog_name="neo")


if __name__ == "__main__":
    sys.exit(main())
