"""The typed events: what they accept from Dodo, what they refuse, and the routing table."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from cli.samples import sample_event, sdk_event_types
from shared.catalog import HANDLED, HANDLED_TYPES, KINDS
from workers.handlers import ROUTES
from workers.schemas import (
    SCHEMAS,
    CreditLedgerEvent,
    DisputeEvent,
    DodoEvent,
    EventValidationError,
    PaymentEvent,
    parse_event,
)

EXTRA_ROUTED = (
    "subscription.past_due",
    "subscription.paused",
    "subscription.unpaused",
    "subscription.update_payment_method",
    "credit.overage_reset",
)


def routed_types() -> list[str]:
    return [*HANDLED_TYPES, *EXTRA_ROUTED]


def body_of(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def parse_sample(event_type: str, **data: Any) -> Any:
    event = sample_event(event_type)
    event["data"].update(data)
    return parse_event(event_type, body_of(event))


class TestRoutingTable:
    @pytest.mark.parametrize("event_type", routed_types())
    def test_every_handled_type_has_a_route_and_a_schema(self, event_type: str) -> None:
        assert event_type in SCHEMAS
        assert event_type in ROUTES

    def test_every_schema_is_a_handled_or_deliberately_routed_type(self) -> None:
        reconciled = {kind.reconciled for kind in KINDS.values() if kind.reconciled}
        assert set(SCHEMAS) == set(HANDLED_TYPES) | set(EXTRA_ROUTED) | reconciled
        assert len(HANDLED_TYPES) == 30 == sum(len(t) for t in HANDLED.values())

    @pytest.mark.parametrize("event_type", sdk_event_types())
    def test_every_sdk_sample_parses_or_is_unknown(self, event_type: str) -> None:
        """None of Dodo's 48 types fails validation: it is typed, or ignored."""
        event = parse_event(event_type, body_of(sample_event(event_type)))
        if event_type in SCHEMAS:
            assert event is not None
            assert event.type == event_type  # type: ignore[attr-defined]
        else:
            assert event is None

    def test_unknown_type_is_not_parsed(self) -> None:
        assert parse_event("thing.happened", b"{}") is None


class TestEventSchemas:
    def test_discriminated_union_picks_the_family_model_by_type(self) -> None:
        adapter: TypeAdapter[Any] = TypeAdapter(DodoEvent)
        assert isinstance(adapter.validate_python(sample_event("dispute.won")), DisputeEvent)
        assert isinstance(adapter.validate_python(sample_event("credit.added")), CreditLedgerEvent)

    def test_fields_dodo_adds_later_are_ignored_but_kept_as_delivered(self) -> None:
        event = parse_sample("payment.succeeded", brand_new_field={"x": 1})
        assert isinstance(event, PaymentEvent)
        assert not hasattr(event.data, "brand_new_field")
        assert event.data.delivered["brand_new_field"] == {"x": 1}
        assert event.data.delivered["customer"]["customer_id"] == event.data.customer_id

    def test_a_status_dodo_adds_later_is_accepted(self) -> None:
        event = parse_sample("payment.processing", status="requires_something_new")
        assert event.data.status == "requires_something_new"

    def test_optional_payload_type_may_be_absent(self) -> None:
        event = sample_event("payment.succeeded")
        event["data"].pop("payload_type", None)
        assert parse_event("payment.succeeded", body_of(event)) is not None

    def test_models_are_frozen(self) -> None:
        event = parse_sample("dispute.opened")
        with pytest.raises(ValidationError):
            event.data.amount = Decimal(1)

    def test_decimal_strings_stay_exact(self) -> None:
        event = parse_sample("credit.added", amount="0.1", balance_after="100.1")
        assert event.data.amount == Decimal("0.1")
        assert event.data.balance_after == Decimal("100.1")

    @pytest.mark.parametrize("value", [0.1, 1e3, True, "NaN", "Infinity", "1e400000", "abc"])
    def test_decimal_fields_refuse_floats_and_non_finite_values(self, value: Any) -> None:
        with pytest.raises(EventValidationError, match=r"data\.amount"):
            parse_sample("credit.deducted", amount=value)

    @pytest.mark.parametrize("value", [25.0, "2500", True, 2**63])
    def test_minor_units_must_be_json_integers_in_range(self, value: Any) -> None:
        with pytest.raises(EventValidationError, match=r"data\.total_amount"):
            parse_sample("payment.succeeded", total_amount=value)

    def test_timestamps_without_a_zone_are_refused(self) -> None:
        event = sample_event("refund.succeeded")
        event["timestamp"] = "2026-03-01T12:00:00"
        with pytest.raises(EventValidationError, match="timestamp"):
            parse_event("refund.succeeded", body_of(event))

    def test_timestamps_are_normalised_to_utc(self) -> None:
        event = sample_event("refund.succeeded")
        event["timestamp"] = "2026-03-01T14:00:00+02:00"
        parsed = parse_event("refund.succeeded", body_of(event))
        assert parsed is not None
        assert parsed.timestamp.isoformat() == "2026-03-01T12:00:00+00:00"

    @pytest.mark.parametrize("field", ["subscription_id", "status", "metadata_note"])
    def test_nul_anywhere_in_data_is_refused(self, field: str) -> None:
        with pytest.raises(EventValidationError, match="NUL"):
            parse_sample("subscription.active", **{field: "a\x00b"})

    def test_the_text_backslash_u0000_is_not_a_nul(self) -> None:
        # A backslash, then "u0000": JSON `"a\\\\u0000b"`, whose bytes contain `\\u0000`.
        event = parse_sample("subscription.active", metadata_note="a\\u0000b")
        assert event is not None
        assert event.data.delivered["metadata_note"] == "a\\u0000b"

    def test_id_longer_than_its_column_is_refused(self) -> None:
        with pytest.raises(EventValidationError, match="refund_id"):
            parse_sample("refund.failed", refund_id="r" * 256)

    def test_a_type_that_does_not_match_the_family_is_refused(self) -> None:
        with pytest.raises(EventValidationError, match="type"):
            parse_event("payment.succeeded", body_of(sample_event("refund.succeeded")))

    def test_validation_errors_name_fields_but_never_echo_values(self) -> None:
        secret = "customer-secret@example.com"
        with pytest.raises(EventValidationError) as caught:
            parse_sample("license_key.created", customer_id=12345, key=[secret])
        message = str(caught.value)
        assert "data.customer_id" in message
        assert "data.key" in message
        assert secret not in message
        assert "12345" not in message

    def test_body_that_is_not_json_is_refused(self) -> None:
        with pytest.raises(EventValidationError):
            parse_event("payment.succeeded", b"not json")
