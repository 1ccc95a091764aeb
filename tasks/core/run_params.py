"""Flow-run parameters as Prefect stores them, with the secrets a caller typed into them masked.

A deployment run's `overrides` (`--param 'overrides={"corpus.sources": ["https://...?sig=..."]}'`)
or a raw `config` reaches Prefect's database before any code of ours runs. The config's own fields
keep secrets out of what they record (`SourceSpec.query`, `SecretStr`), but the raw parameters are
stored as sent. `scrub_flow_run_parameters`, called by `resolve_config` inside a flow run, writes
them back with every string passed through `tasks.core.urls.redact`. The run itself keeps the
values it was started with; a later re-run of that same flow run from the UI gets the masked ones
(the stages it already finished are reused by fingerprint, which never holds the secrets).
Prefect is imported only when it is already loaded: the stages' logic stays Prefect-free.
"""
from __future__ import annotations

import sys
from typing import Any

from tasks.core.urls import redact


def redact_value(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers) with every string through `redact`."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


def scrub_flow_run_parameters() -> bool:
    """Inside a Prefect flow run whose stored parameters hold secrets, store them redacted; returns
    whether it did. Outside a flow run (or without Prefect loaded) nothing happens."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    if run is None or not run.parameters:
        return False
    clean = redact_value(run.parameters)
    if clean == run.parameters:
        return False
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, parameters=clean)
    run.parameters = clean
    return True
