"""Notifications: a webhook hears about failed `retrain` runs and model promotions.

`neo notify setup --webhook URL` stores, on the Prefect server named by `PREFECT_API_URL`, a custom
webhook notification block and two automations that send through it:

- `neo-retrain-failed`: a flow run of the `neo_pipeline/retrain` deployment entered Failed or Crashed;
- `neo-model-promoted`: the event `neo.model.promoted`, which tasks/register/registry.py emits whenever a version
  becomes champion (the register stage's gate, `neo promote`, `neo rollback`).

The webhook receives JSON `{"subject": ..., "body": ..., "source": "neo-pipeline"}`. Setup is
idempotent: a rerun updates the block and both automations in place (e.g. to change the URL). The
server's `triggers` and `actions` services evaluate automations; `prefect server start` runs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from tasks.register.registry import PROMOTED_EVENT

BLOCK_NAME = "neo-webhook"
FAILED_AUTOMATION = "neo-retrain-failed"
PROMOTED_AUTOMATION = "neo-model-promoted"
FLOW_NAME, DEPLOYMENT_NAME = "neo_pipeline", "retrain"

FAILED_SUBJECT = "neo-pipeline: retrain run {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = ("Flow run {{ flow_run.name }} (id {{ flow_run.id }}) of deployment "
               f"{FLOW_NAME}/{DEPLOYMENT_NAME} entered {{{{ flow_run.state.name }}}}: "
               "{{ flow_run.state.message }}")
PROMOTED_SUBJECT = ("neo-pipeline: {{ event.resource['neo.model.name'] }} version "
                    "{{ event.resource['neo.model.version'] }} is champion")
PROMOTED_BODY = ("Model {{ event.resource['neo.model.name'] }} version {{ event.resource['neo.model.version'] }}"
                 " is now @champion (previous champion: {{ event.payload.previous_champion or 'none' }}). "
                 "Reason: {{ event.payload.reason }}."
                 "{% if flow_run %} Flow run: {{ flow_run.name }} (id {{ flow_run.id }}).{% endif %}")


@dataclass
class NotifySetup:
    block_id: UUID
    automations: dict[str, UUID]


def _save_block(url: str) -> UUID:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--webhook {url!r}: expected an http:// or https:// URL")
    block = CustomWebhookNotificationBlock(
        name="neo-pipeline", url=url, method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "neo-pipeline"})
    return block.save(BLOCK_NAME, overwrite=True)


def automations(block_id: UUID) -> list:
    """The two automations (AutomationCore) that notify through the block `block_id`."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    failed = AutomationCore(
        name=FAILED_AUTOMATION, description=f"Notify when a {FLOW_NAME}/{DEPLOYMENT_NAME} run fails.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
                           {"prefect.resource.role": "deployment", "prefect.resource.name": DEPLOYMENT_NAME}],
            posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)])
    promoted = AutomationCore(
        name=PROMOTED_AUTOMATION, description="Notify when a model version becomes champion.",
        trigger=EventTrigger(expect={PROMOTED_EVENT}, match={"prefect.resource.id": "neo.model.*"},
                             posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=block_id, subject=PROMOTED_SUBJECT, body=PROMOTED_BODY)])
    return [failed, promoted]


def setup(webhook: str) -> NotifySetup:
    """Create or update the webhook block and both automations on the configured Prefect server."""
    from prefect.client.orchestration import get_client

    block_id = _save_block(webhook)
    ids: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        for automation in automations(block_id):
            existing = client.read_automations_by_name(automation.name)
            for extra in existing[1:]:  # duplicates made by hand: keep exactly one
                client.delete_automation(extra.id)
            if existing:
                client.update_automation(existing[0].id, automation)
                ids[automation.name] = existing[0].id
            else:
                ids[automation.name] = client.create_automation(automation)
    return NotifySetup(block_id=block_id, automations=ids)
