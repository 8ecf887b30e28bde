"""License keys: one row per key id holding the state of the event that occurred last."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared.models import LicenseKey, Outcome
from tests.handlers.events import (
    apply,
    apply_body,
    apply_then_fail,
    at,
    count,
    delivery_for,
    make_body,
    make_event,
)
from workers.schemas import EventValidationError


class TestApplyLicenseKeyEvent:
    def test_created_event_stores_the_key(self, factory: sessionmaker[Session]) -> None:
        event, delivery = make_event(
            "license_key.created",
            id="lk_1",
            key="KEY-1",
            customer_id="cus_1",
            product_id="pdt_1",
            expires_at="2027-01-01T00:00:00+02:00",
        )
        assert apply(factory, event, delivery) is Outcome.APPLIED
        with factory() as session:
            row = session.get(LicenseKey, "lk_1")
            assert row is not None
            assert (row.key, row.status, row.customer_id, row.product_id) == (
                "KEY-1",
                "active",
                "cus_1",
                "pdt_1",
            )
            assert row.expires_at is not None
            assert row.expires_at.isoformat() == "2026-12-31T22:00:00+00:00"

    def test_older_event_does_not_overwrite_newer_state(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply(factory, *make_event("license_key.created", when=at(9), id="lk_1", status="disabled"))
        late = make_event("license_key.created", when=at(1), id="lk_1", status="active")
        assert apply(factory, *late) is Outcome.SUPERSEDED
        with factory() as session:
            row = session.get(LicenseKey, "lk_1")
            assert row is not None
            assert row.status == "disabled"

    def test_same_delivery_applied_twice_leaves_one_row(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event("license_key.created", id="lk_1")
        apply(factory, event, delivery)
        assert apply(factory, event, delivery) is Outcome.APPLIED
        assert count(factory, LicenseKey) == 1

    def test_naive_expiry_fails_validation_before_any_write(
        self, factory: sessionmaker[Session]
    ) -> None:
        body = make_body("license_key.created", id="lk_1")
        body["data"]["expires_at"] = "2027-01-01T00:00:00"
        with pytest.raises(EventValidationError, match="expires_at"):
            apply_body(factory, body, delivery_for("msg_bad"))
        assert count(factory, LicenseKey) == 0


class TestRollback:
    def test_a_failure_after_the_handler_wrote_leaves_nothing_behind(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The handler never commits: what it wrote goes when the transaction fails later."""
        event, delivery = make_event("license_key.created", id="lic_1")
        assert apply_then_fail(factory, event, delivery, LicenseKey) == [1]
        assert count(factory, LicenseKey) == 0
