"""Realistic sample events for every type the official `dodopayments` SDK knows.

Built by walking the SDK's own models, so a sample has every field Dodo documents, and
checked against the SDK model before it is returned. Used by `dodo-webhooks send-test`,
the tests and the benchmark.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

_STATUS_BY_TYPE: dict[str, dict[str, Any]] = {
    "payment.succeeded": {"status": "succeeded"},
    "payment.failed": {
        "status": "failed",
        "error_code": "card_declined",
        "error_message": "The card was declined.",
    },
    "payment.processing": {"status": "processing"},
    "payment.cancelled": {"status": "cancelled"},
    "refund.succeeded": {"status": "succeeded"},
    "refund.failed": {"status": "failed"},
    "subscription.active": {"status": "active"},
    "subscription.updated": {"status": "active"},
    "subscription.renewed": {"status": "active"},
    "subscription.plan_changed": {"status": "active"},
    "subscription.on_hold": {"status": "on_hold"},
    "subscription.cancelled": {"status": "cancelled", "cancelled_at": "{now}"},
    "subscription.failed": {"status": "failed"},
    "subscription.expired": {"status": "expired"},
    "subscription.past_due": {"status": "past_due"},
    "subscription.paused": {"status": "paused", "paused_at": "{now}"},
    "subscription.unpaused": {"status": "active"},
    "subscription.update_payment_method": {"status": "active"},
    "license_key.created": {"status": "active"},
}
for _t in ("opened", "expired", "accepted", "cancelled", "challenged", "won", "lost"):
    _STATUS_BY_TYPE[f"dispute.{_t}"] = {"dispute_status": f"dispute_{_t}"}

TRANSACTION_BY_TYPE = {
    "credit.added": ("credit_added", True),
    "credit.deducted": ("credit_deducted", False),
    "credit.expired": ("credit_expired", False),
    "credit.rolled_over": ("credit_rolled_over", True),
    "credit.rollover_forfeited": ("rollover_forfeited", False),
    "credit.overage_charged": ("overage_charged", False),
    "credit.overage_reset": ("overage_reset", True),
    "credit.manual_adjustment": ("manual_adjustment", True),
}

# Field names whose sample value reads like a Dodo id.
_ID_PREFIX = {
    "payment_id": "pay",
    "refund_id": "ref",
    "dispute_id": "dis",
    "subscription_id": "sub",
    "customer_id": "cus",
    "product_id": "pdt",
    "business_id": "bus",
    "brand_id": "brd",
    "credit_entitlement_id": "cde",
    "payout_id": "pout",
    "grant_id": "grt",
    "id": "id",
    "discount_id": "dsc",
    "checkout_session_id": "cks",
    "invoice_id": "inv",
    "payment_method_id": "pm",
    "addon_id": "adn",
    "meter_id": "mtr",
    "license_key_id": "lk",
}


@cache
def sdk_models() -> dict[str, type[BaseModel]]:
    """Event type -> the SDK's model for the whole webhook event."""
    from dodopayments.types.unwrap_webhook_event import UnwrapWebhookEvent

    union = get_args(UnwrapWebhookEvent)[0]
    models: dict[str, type[BaseModel]] = {}
    for model in get_args(union):
        (event_type,) = get_args(model.model_fields["type"].annotation)
        models[event_type] = model
    return models


def sdk_event_types() -> tuple[str, ...]:
    return tuple(sorted(sdk_models()))


def _synth(annotation: Any, name: str, now: datetime, depth: int = 0) -> Any:
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _synth(get_args(annotation)[0], name, now, depth)
    if origin in (Union, types.UnionType):
        choices = [a for a in get_args(annotation) if a is not type(None)]
        return _synth(choices[0], name, now, depth) if choices else None
    if origin is Literal:
        values = get_args(annotation)
        preferred = [v for v in values if v in ("USD", "US", "card")]
        return preferred[0] if preferred else values[0]
    if origin in (list, typing.List):  # noqa: UP006 - the SDK spells it typing.List
        return []
    if origin in (dict, typing.Dict):  # noqa: UP006
        return {}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _synth_model(annotation, now, depth + 1)
    if annotation is str:
        if name in _ID_PREFIX or name.endswith("_id"):
            return f"{_ID_PREFIX.get(name, name.removesuffix('_id'))}_sample0001"
        if name == "email":
            return "customer@example.com"
        if name == "card_last_four":
            return "4242"
        if name == "key":
            return "LK-SAMPLE-0001-ABCD"
        if name in ("currency", "settlement_currency"):
            return "USD"
        if "amount" in name or "balance" in name or "overage" in name:
            return "100.00"
        return f"sample {name.replace('_', ' ')}"
    if annotation is bool:
        return False
    if annotation is int:
        return 2500 if "amount" in name or name in ("tax", "settlement_tax") else 1
    if annotation is float:
        return 1.0
    if annotation is datetime:
        later = ("next_billing_date", "expires_at")
        return (now + timedelta(days=30) if name in later else now).isoformat()
    if annotation is date:
        return now.date().isoformat()
    if annotation is object or annotation is Any:
        return None
    return None


def _synth_model(model: type[BaseModel], now: datetime, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if depth > 3 and not field.is_required():
            continue
        if not field.is_required() and _is_plain_optional_text(field.annotation, name):
            continue
        value = _synth(field.annotation, name, now, depth)
        if value is not None or field.is_required():
            out[field.alias or name] = value
    return out


_OPTIONAL_TEXT_KEPT = {"currency", "card_last_four", "card_network", "payment_method", "reason"}


def _is_plain_optional_text(annotation: Any, name: str) -> bool:
    """Optional free text (error messages, URLs, names) is left out unless it matters."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args == [str] and not name.endswith("_id") and name not in _OPTIONAL_TEXT_KEPT


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{dotted}: {part} is not an object")
    node[leaf] = value


def parse_override(assignment: str) -> tuple[str, Any]:
    """`data.status=cancelled` -> ("data.status", "cancelled"); JSON values are decoded."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"expected key=value, got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def sample_event(
    event_type: str,
    *,
    timestamp: datetime | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A full envelope `{business_id, type, timestamp, data}` for any SDK-known type.

    `overrides` maps dotted paths (`data.status`, `timestamp`) to values. Types the SDK does
    not know get a minimal envelope (Dodo may add types: they must be accepted too).
    """
    now = (timestamp or datetime.now(UTC)).astimezone(UTC)
    model = sdk_models().get(event_type)
    if model is None:
        data: dict[str, Any] = {}
    else:
        data = _synth_model(model.model_fields["data"].annotation, now, 0)  # type: ignore[arg-type]
        for key, value in _STATUS_BY_TYPE.get(event_type, {}).items():
            data[key] = now.isoformat() if value == "{now}" else value
        if event_type in TRANSACTION_BY_TYPE:
            kind, is_credit = TRANSACTION_BY_TYPE[event_type]
            before, amount = Decimal("100.00"), Decimal("25.00")
            after = before + amount if is_credit else before - amount
            data.update(
                transaction_type=kind,
                is_credit=is_credit,
                amount=str(amount),
                balance_before=str(before),
                balance_after=str(after),
                overage_before="0.00",
                overage_after="0.00",
                created_at=now.isoformat(),
            )
        if event_type.startswith("payment."):
            data.update(payload_type="Payment", refund_status=None, payment_method="card")
    event = {
        "business_id": "bus_sample0001",
        "type": event_type,
        "timestamp": now.isoformat(),
        "data": data,
    }
    for path, value in (overrides or {}).items():
        _set_path(event, path, value)
    if model is not None:
        model.model_validate(event)  # the SDK's own model must accept what we send
    return event


def sample_object(
    model: type[BaseModel], *, now: datetime | None = None, **fields: Any
) -> dict[str, Any]:
    """One of the SDK's API objects (a `Payment`, a `CreditLedgerEntry`, ...) with every field
    it documents, `fields` overridden, as the API's JSON; checked by the SDK's model."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    data = {**_synth_model(model, when, 0), **fields}
    return model.model_validate(data).model_dump(mode="json")
