"""`neo` command line: run the pipeline, verify stage outputs.

Configuration is validated and the embedded Prefect/MLflow locations are set before Prefect is
imported, so a bad `--set` fails in milliseconds, naming the key, and no work starts.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tasks.config import ConfigError, default_workspace, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="neo-pipeline: pre-train GPT-Neo with Prefect and MLflow.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: str = typer.Option("tiny", "-c", "--config", help="Preset name in configs/ or a YAML path."),
    set_: list[str] = typer.Option([], "--set", help="Override: section.key=value (repeatable)."),
    workspace: Optional[Path] = typer.Option(None, "-w", "--workspace",
                                             help="Workspace root (default $NEO_HOME or ./.neo)."),
) -> None:
    """Run the whole pipeline: download, clean, dedup, tokenize, train, evaluate, register."""
    try:
        cfg = load_config(config, set_)
    except ConfigError as exc:
        _fail(str(exc))
    ws = (workspace or default_workspace()).resolve()
    from flows.runtime import configure, ui_instructions

    configure(ws)
    typer.echo(f"neo: config {cfg.name!r}, workspace {ws}")
    from flows.pipeline import neo_pipeline

    s = neo_pipeline(config=cfg, workspace=str(ws))
    reused = [name for name, r in s.stages.items() if r.reused]
    lines = [
        "",
        "== neo-pipeline summary ==",
        f"registered model : {s.model_name} version {s.version} (@{s.alias})",
        f"validation       : perplexity {s.val_ppl:.2f}, bits-per-byte {s.val_bpb:.4f} "
        f"(unigram baseline {s.unigram_val_bpb:.4f})",
        f"MLflow run       : {s.run_id}",
        f"workspace        : {ws}",
        *(f"stage {n:<11}: {r.path}" for n, r in s.stages.items()),
        *ui_instructions(ws),
    ]
    if reused:
        lines.insert(-2, f"reused outputs   : {', '.join(reused)}")
    typer.echo("\n".join(lines))


@app.command()
def verify(workspace: Optional[Path] = typer.Option(None, "-w", "--workspace")) -> None:
    """Re-hash every stage output against its manifest (full sha256 check)."""
    from tasks.stage import MANIFEST, verify_manifest

    ws = (workspace or default_workspace()).resolve()
    dirs = sorted(p.parent for p in ws.glob(f"*/*/{MANIFEST}"))
    problems = [msg for d in dirs for msg in verify_manifest(d)]
    for msg in problems:
        typer.secho(msg, fg=typer.colors.RED)
    typer.echo(f"verified {len(dirs)} stage directories, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="neo")


if __name__ == "__main__":
    sys.exit(main())
