"""Where Prefect and MLflow live: embedded in the workspace unless servers are configured.

Prefect reads its settings when first imported, so `configure` must run before anything imports
Prefect (the CLI calls it first). With `PREFECT_API_URL` set, Prefect talks to that server; without
it, Prefect starts its ephemeral API on a SQLite database under `<workspace>/prefect`. MLflow uses
`MLFLOW_TRACKING_URI` when set, else `sqlite:///<workspace>/mlflow/mlflow.db` (tasks/core/tracking.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline machines: telemetry only logs errors
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "true",
    # The ephemeral API's default 20 s start-up limit is too short on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # `neo run` prints stage progress; MLflow's table-creation lines and download bars are noise there.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def configure(workspace: str | Path) -> dict[str, str]:
    """Set the environment for embedded mode; returns what it set. Never overrides the user."""
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    applied = {k: v for k, v in OFFLINE_DEFAULTS.items() if k not in os.environ}
    if not os.environ.get("PREFECT_API_URL"):
        # Embedded mode: Prefect's database and results belong to this workspace.
        applied["PREFECT_HOME"] = str(ws / "prefect")
        applied["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(ws / "prefect" / "storage")
    os.environ.update(applied)
    return applied


def shield_embedded_server() -> None:
    """Start Prefect's embedded API server in a session of its own.

    A SIGTERM (or Ctrl-C) to `neo run`'s process group would otherwise kill the embedded server
    together with the run, and the run would then block in client retries trying to record its
    Crashed state on a server that is gone. In its own session the server outlives the signal long
    enough for the run to record the crash and exit; Prefect stops it at exit as usual."""
    import subprocess

    from prefect.server.api import server

    if getattr(server.SubprocessASGIServer, "_neo_shielded", False):
        return
    start = server.SubprocessASGIServer._run_uvicorn_command

    def start_in_own_session(self):
        popen = subprocess.Popen

        def own_session(*args, **kwargs):
            return popen(*args, start_new_session=True, **kwargs)

        server.subprocess.Popen = own_session
        try:
            return start(self)
        finally:
            server.subprocess.Popen = popen

    server.SubprocessASGIServer._run_uvicorn_command = start_in_own_session
    server.SubprocessASGIServer._neo_shielded = True


def prestart(workspace: str | Path) -> Callable[[], None]:
    """Start, in background threads, what the first flow run would otherwise wait for in turn: the
    embedded Prefect API server (Prefect's own, which the run then finds started) and, in a workspace
    without one yet, the embedded MLflow store (its schema migrations, mostly waiting on the disk).
    The caller imports its flows meanwhile, then calls the returned function, which waits for both
    and raises the server's start error as the run would have (a store that could not be created is
    left to MLflow to create where a stage needs it). Configured servers (PREFECT_API_URL,
    MLFLOW_TRACKING_URI) are left alone."""
    import contextvars
    import threading

    jobs: list[tuple[Callable[[], None], bool]] = []  # (job, whether its error fails the run here)
    after: list[Callable[[], None]] = []
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.logging.configuration import setup_logging
        from prefect.server.api.server import SubprocessASGIServer

        setup_logging()  # as `import prefect` would: the server's "Starting temporary server" line shows
        save = seed_prefect_db()
        if save is not None:
            after.append(save)
        jobs.append((SubprocessASGIServer().start, True))
    db = Path(workspace).resolve() / "mlflow" / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not db.exists():
        def create_store() -> None:
            from tasks.core import tracking

            tracking.client(workspace).search_experiments(max_results=1)

        jobs.append((create_store, False))
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None], fatal: bool) -> None:
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread, or left to the stage
            if fatal:
                errors.append(exc)

    # each thread runs in a copy of this context: Prefect's settings (e.g. a temporary_settings block)
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(guarded, *job), daemon=True,
                                name="neo-prestart") for job in jobs]
    for t in threads:
        t.start()

    def wait() -> None:
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for job in after:
            job()

    return wait


def seed_prefect_db() -> Callable[[], None] | None:
    """A new workspace's Prefect database starts as a copy of an empty, migrated one kept per Prefect
    version in the cache (`$NEO_CACHE_DIR`, default ~/.cache/neo-pipeline): Prefect's migrations of a
    new SQLite database take ~8 s of a 2-core machine's CPU on every fresh workspace. Without a copy
    yet, returns the job that makes one once the server has migrated this workspace's database, before
    any run is recorded in it (SQLite's online backup: a consistent snapshot). Nothing happens when
    the database is configured elsewhere or already exists."""
    import shutil
    import sqlite3

    import prefect
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from tasks.core.storage import cache_root

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value() or "")
    db = Path(os.environ.get("PREFECT_HOME", "")) / "prefect.db"
    if not url.startswith("sqlite") or Path(url.split("///", 1)[-1]).resolve() != db.resolve() or db.exists():
        return None
    template = cache_root() / "prefect-db" / f"prefect-{prefect.__version__}.db"
    if template.is_file():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db.with_suffix(".db.part"))
        os.replace(db.with_suffix(".db.part"), db)
        return None

    def save() -> None:
        try:
            template.parent.mkdir(parents=True, exist_ok=True)
            part = template.with_name(f"{template.name}.{os.getpid()}.part")
            src, dst = sqlite3.connect(db), sqlite3.connect(part)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
            os.replace(part, template)
        except (OSError, sqlite3.Error):  # a cache that cannot be written only costs the next run time
            pass

    return save


def ui_instructions(workspace: str | Path) -> list[str]:
    """How to look at this workspace's runs, with the commands of the environment `neo` runs in."""
    ws = Path(workspace).resolve()
    bindir = Path(sys.executable).parent
    lines = []
    if os.environ.get("PREFECT_API_URL"):
        lines.append(f"Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        lines.append(f"Prefect UI: PREFECT_HOME={ws / 'prefect'} {bindir / 'prefect'} server start  "
                     "-> http://127.0.0.1:4200")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("http"):
        lines.append(f"MLflow UI: {uri}")
    else:
        lines.append(f"MLflow UI: {bindir / 'mlflow'} ui --backend-store-uri {uri or f'sqlite:///{ws}/mlflow/mlflow.db'} "
                     "--port 5000  -> http://127.0.0.1:5000")
    return lines
