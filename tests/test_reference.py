"""The reference model itself: it must be right for the model-based test to mean anything."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cli.samples import sample_event
from tests.reference import Sent, chain_order, differences, expected_state

T0 = datetime(2026, 2, 1, tzinfo=UTC)


def payment(status: str, at: datetime, webhook_id: str, webhook_ts: int = 100) -> Sent:
    body = sample_event(f"payment.{status}", timestamp=at, overrides={"data.payment_id": "pay_1"})
    return Sent(webhook_id, webhook_ts, body)


def entry(entry_id: str, before: int, after: int, at: datetime) -> dict[str, Any]:
    return {
        "id": entry_id,
        "created_at": at.isoformat(),
        "balance_before": str(before),
        "balance_after": str(after),
        "overage_before": "0",
        "overage_after": "0",
    }


class TestExpectedState:
    def test_the_event_that_occurred_last_wins_whatever_the_list_order(self) -> None:
        late = payment("succeeded", T0 + timedelta(seconds=1), "msg_a")
        early = payment("processing", T0, "msg_b")
        state = expected_state([late, early])
        assert state.records["payments"]["pay_1"]["status"] == "succeeded"

    def test_equal_timestamps_fall_to_webhook_timestamp_then_webhook_id(self) -> None:
        first = payment("succeeded", T0, "msg_z", webhook_ts=100)
        second = payment("failed", T0, "msg_a", webhook_ts=200)
        assert expected_state([second, first]).records["payments"]["pay_1"]["status"] == "failed"
        third = payment("cancelled", T0, "msg_zz", webhook_ts=200)
        record = expected_state([third, second, first]).records["payments"]["pay_1"]
        assert record["last_event"]["webhook_id"] == "msg_zz"

    def test_a_webhook_id_counts_once(self) -> None:
        sent = payment("succeeded", T0, "msg_a")
        assert expected_state([sent, sent]).records["payments"]["pay_1"]["status"] == "succeeded"


class TestChainOrder:
    def test_a_tie_follows_the_chain_not_the_ids(self) -> None:
        tied = [entry("a", 7, 5, T0), entry("b", 10, 7, T0), entry("c", 0, 10, T0)]
        assert [e["id"] for e in chain_order(tied)] == ["c", "b", "a"]


class TestDifferences:
    def test_reports_a_changed_value_a_missing_key_and_a_shorter_list(self) -> None:
        expected = {"status": "active", "amount": "1.50", "history": [1, 2]}
        answered = {"amount": "1.5", "history": [1]}
        assert differences(expected, answered, "x") == [
            "x.status: missing",
            "x.history: 1 items, expected 2",
        ]

    def test_datetimes_and_decimals_compare_by_value_not_spelling(self) -> None:
        expected = {"timestamp": "2026-02-01T00:00:00Z", "balance": "10.0"}
        answered = {"timestamp": "2026-02-01T00:00:00+00:00", "balance": "10.00", "extra": 1}
        assert differences(expected, answered) == []
