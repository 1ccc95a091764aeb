"""Notifications without a server: the promotion event, what each automation matches, its texts.

The integration stack (test_integration_stack.py) checks the webhook end to end on a real server.
"""
import asyncio
import logging
from datetime import datetime, timezone
from uuid import UUID, uuid4

import pytest
from prefect.server.events.schemas.automations import EventTrigger
from prefect.server.events.schemas.events import Event, RelatedResource, Resource
from prefect.server.utilities.user_templates import render_user_template
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import notify
from tasks.register import registry


@pytest.fixture
def captured(monkeypatch) -> list[dict]:
    """What `announce_promotion` hands to Prefect's `emit_event` (the real send is checked end to end
    in test_integration_stack.py)."""
    sent: list[dict] = []
    monkeypatch.setattr("prefect.events.emit_event", lambda event, **kw: sent.append({"event": event, **kw}))
    return sent


def test_promotion_emits_an_event_naming_the_version(captured):
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        registry.announce_promotion("gpt-neo-x", "3", "2", "bpb 1.1 beats champion v2")
    [sent] = captured
    assert sent["event"] == registry.PROMOTED_EVENT == "neo.model.promoted"
    resource = Resource.model_validate(sent["resource"])  # a valid Prefect event resource
    assert resource.id == "neo.model.gpt-neo-x.3"
    assert (resource["neo.model.name"], resource["neo.model.version"]) == ("gpt-neo-x", "3")
    assert sent["payload"] == {"previous_champion": "2", "reason": "bpb 1.1 beats champion v2"}


def test_no_server_no_event_and_a_failing_emit_never_fails_promotion(captured, monkeypatch, caplog):
    registry.announce_promotion("m", "1", None, "first model")  # no API URL, no run: nothing sent
    assert captured == []

    def broken(*args, **kwargs):
        raise RuntimeError("events socket closed")

    monkeypatch.setattr("prefect.events.emit_event", broken)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), caplog.at_level(logging.WARNING):
        registry.announce_promotion("m", "1", None, "first model")
    assert "could not emit neo.model.promoted for m v1: events socket closed" in caplog.text


def _event(name: str, resource: dict, related: list[dict] = (), payload: dict | None = None) -> Event:
    return Event(id=uuid4(), occurred=datetime.now(timezone.utc), event=name, resource=Resource.model_validate(resource),
                 related=[RelatedResource.model_validate(r) for r in related], payload=payload or {})


def _run_event(state: str, flow: str, deployment: str | None) -> Event:
    related = [{"prefect.resource.id": "prefect.flow.f1", "prefect.resource.role": "flow",
                "prefect.resource.name": flow}]
    if deployment:
        related.append({"prefect.resource.id": "prefect.deployment.d1", "prefect.resource.role": "deployment",
                        "prefect.resource.name": deployment})
    return _event(f"prefect.flow-run.{state}", {"prefect.resource.id": "prefect.flow-run.r1"}, related)


def _fires(automation, event: Event) -> bool:
    trigger = EventTrigger.model_validate(automation.trigger.model_dump(mode="json"))
    return trigger.expects(event.event) and trigger.covers_resources(event.resource, event.related)


def test_failed_automation_fires_only_for_retrain_runs_that_failed():
    failed, promoted = notify.automations(UUID(int=1))
    assert (failed.name, promoted.name) == (notify.FAILED_AUTOMATION, notify.PROMOTED_AUTOMATION)
    assert _fires(failed, _run_event("Failed", "neo_pipeline", "retrain"))
    assert _fires(failed, _run_event("Crashed", "neo_pipeline", "retrain"))
    assert not _fires(failed, _run_event("Completed", "neo_pipeline", "retrain"))
    assert not _fires(failed, _run_event("Failed", "neo_pipeline", None))  # a local `neo run`
    assert not _fires(failed, _run_event("Failed", "neo_data", "data-refresh"))
    assert not _fires(failed, _run_event("Failed", "other_flow", "retrain"))
    assert not _fires(promoted, _run_event("Failed", "neo_pipeline", "retrain"))
    assert [a.block_document_id for a in (*failed.actions, *promoted.actions)] == [UUID(int=1)] * 2


def test_promotion_automation_fires_and_renders_the_version():
    _, promoted = notify.automations(UUID(int=1))
    event = _event(registry.PROMOTED_EVENT, {"prefect.resource.id": "neo.model.gpt-neo-x.3",
                                             "neo.model.name": "gpt-neo-x", "neo.model.version": "3"},
                   payload={"previous_champion": None, "reason": "first model"})
    assert _fires(promoted, event)
    body = asyncio.run(render_user_template(notify.PROMOTED_BODY, {"event": event, "flow_run": None}))
    assert body == "Model gpt-neo-x version 3 is now @champion (previous champion: none). Reason: first model."


def test_setup_refuses_a_url_that_is_not_http():
    with pytest.raises(ValueError, match="--webhook 'hooks.example': expected an http"):
        notify._save_block("hooks.example")


def test_cli_setup_needs_a_prefect_server():
    from typer.testing import CliRunner

    from flows.cli.main import app

    result = CliRunner().invoke(app, ["notify", "setup", "--webhook", "http://127.0.0.1:9/hook"])
    assert result.exit_code == 2 and "PREFECT_API_URL is not set" in result.output
