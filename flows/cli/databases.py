"""The local stack's databases: SQLite in the workspace, or PostgreSQL databases it creates and drops.

Prefect and MLflow each keep their migration state in an `alembic_version` table, so on PostgreSQL
they get one database each (`BASE_prefect`, `BASE_mlflow`).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

DB_URL_ENV = "NEO_STACK_DB_URL"


class StackError(RuntimeError):
    """A service could not be started or a setting is wrong; the message says which and why."""


def database_urls(workspace: Path, db_url: str | None) -> tuple[str, str, str]:
    """(Prefect URL, MLflow URL, description with the password hidden) for SQLite or PostgreSQL."""
    if not db_url:
        return (f"sqlite+aiosqlite:///{workspace / 'prefect' / 'prefect.db'}",
                f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}", "SQLite in the workspace")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(db_url)
    except ArgumentError as exc:
        raise StackError(f"--db-url / ${DB_URL_ENV}: {exc}") from None
    if url.get_backend_name() != "postgresql":
        raise StackError(f"--db-url / ${DB_URL_ENV}: expected postgresql://USER@HOST:PORT/BASE, got "
                         f"{url.render_as_string()!r}")
    base = url.database or "neo"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,50}", base):
        raise StackError(f"--db-url: database base name {base!r} must be letters, digits and _")
    if importlib.util.find_spec("psycopg"):
        mlflow_driver = "postgresql+psycopg"
    elif importlib.util.find_spec("psycopg2"):
        mlflow_driver = "postgresql+psycopg2"
    else:
        raise StackError("MLflow on PostgreSQL needs a driver: pip install 'psycopg[binary]'")
    prefect = url.set(drivername="postgresql+asyncpg", database=f"{base}_prefect")
    mlflow = url.set(drivername=mlflow_driver, database=f"{base}_mlflow")
    return (prefect.render_as_string(hide_password=False), mlflow.render_as_string(hide_password=False),
            f"PostgreSQL at {url.host}:{url.port or 5432}, databases {base}_prefect and {base}_mlflow")


def _on_server(urls: tuple[str, ...], sql: str) -> list[str]:
    """Run `sql` (with {db} for each URL's database name) on each URL's server, connected to the
    `postgres` maintenance database through asyncpg (it ships with Prefect); returns the names acted on.
    With sql starting "CREATE", a database that exists already is left alone and not returned."""
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    async def run() -> list[str]:
        done = []
        for raw in urls:
            u = make_url(raw)
            try:
                conn = await asyncpg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username,
                                             password=u.password, database="postgres", timeout=10)
            except (OSError, asyncpg.PostgresError) as exc:
                raise StackError(f"cannot reach PostgreSQL at {u.host}:{u.port or 5432}: {exc}") from None
            try:
                if sql.startswith("CREATE") and await conn.fetchval(
                        "SELECT 1 FROM pg_database WHERE datname = $1", u.database):
                    continue
                await conn.execute(sql.format(db=f'"{u.database}"'))
                done.append(u.database)
            finally:
                await conn.close()
        return done

    return asyncio.run(run())


def ensure_databases(*urls: str) -> list[str]:
    """Create each URL's PostgreSQL database if missing; returns the names created."""
    return _on_server(urls, "CREATE DATABASE {db}")


def drop_databases(*urls: str) -> list[str]:
    """Drop each URL's PostgreSQL database (connections are closed by force)."""
    return _on_server(urls, "DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def postgres_reachable(url: str) -> bool:
    try:
        _on_server((url,), "SELECT 1")
        return True
    except StackError:
        return False
