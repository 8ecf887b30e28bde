"""workers.statements.run_prebuilt: statements compiled once, run with the processing they need."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, select, update

from shared.db import insert_once, utcnow
from shared.models import CreditBalance, Payment, WebhookEvent
from workers.statements import run_prebuilt

PAYMENTS = cast(Table, Payment.__table__)
EVENTS = cast(Table, WebhookEvent.__table__)
BALANCES = cast(Table, CreditBalance.__table__)
KOLKATA = timezone(timedelta(hours=5, minutes=30))


def payment_row(payment_id: str, **changes: Any) -> dict[str, Any]:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=KOLKATA)
    return {
        "payment_id": payment_id,
        "status": "succeeded",
        "total_amount": 1000,
        "currency": "USD",
        "last_event_type": "payment.succeeded",
        "last_event_at": at,
        "last_webhook_ts": 1,
        "last_webhook_id": "msg_1",
        "data": {"metadata": {"note": 'é "quoted"'}, "n": [1, 2]},
        "updated_at": at,
        **changes,
    }


class TestRunPrebuilt:
    def test_insert_processes_json_and_utc_datetimes_as_execute_does(
        self, clean_db: Engine
    ) -> None:
        insert = insert_once("postgresql", PAYMENTS, ("payment_id",), ("payment_id",))
        with clean_db.begin() as conn:
            prebuilt = run_prebuilt(conn, insert, payment_row("pay_a")).all()
            executed = conn.execute(insert, payment_row("pay_b")).all()
            again = run_prebuilt(conn, insert, payment_row("pay_a")).all()
        assert (prebuilt, executed, again) == ([("pay_a",)], [("pay_b",)], [])
        with clean_db.connect() as conn:
            rows = conn.execute(select(PAYMENTS).order_by(PAYMENTS.c.payment_id)).mappings().all()
        a, b = ({k: v for k, v in r.items() if k != "payment_id"} for r in rows)
        assert a == b
        assert a["data"] == payment_row("pay_a")["data"]
        assert a["last_event_at"] == datetime(2026, 1, 1, 21, 34, 5, tzinfo=UTC)

    def test_each_set_of_parameter_names_gets_its_own_sql(self, clean_db: Engine) -> None:
        insert = insert_once("postgresql", PAYMENTS, ("payment_id",), ("payment_id",))
        full = payment_row("pay_full", customer_id="cus_1")
        with clean_db.begin() as conn:
            run_prebuilt(conn, insert, payment_row("pay_short"))
            run_prebuilt(conn, insert, full)
            held = dict(
                conn.execute(
                    select(PAYMENTS.c.payment_id, PAYMENTS.c.customer_id).order_by(
                        PAYMENTS.c.payment_id
                    )
                ).all()
            )
        assert held == {"pay_full": "cus_1", "pay_short": None}

    def test_statement_constants_are_sent(self, clean_db: Engine) -> None:
        with clean_db.begin() as conn:
            conn.execute(
                insert_once("postgresql", EVENTS, ("webhook_id",)),
                {
                    "webhook_id": "msg_c",
                    "status": "pending",
                    "attempts": 0,
                    "body": b"{}",
                    "headers": {},
                    "webhook_ts": 1,
                },
            )
        # "processing" is a constant of the statement, not a parameter given at the call.
        claim = (
            update(EVENTS)
            .where(EVENTS.c.webhook_id == bindparam("b_id"))
            .values(status="processing")
        )
        with clean_db.begin() as conn:
            assert run_prebuilt(conn, claim, {"b_id": "msg_c"}).rowcount == 1
            assert conn.execute(select(EVENTS.c.status)).scalar_one() == "processing"

    def test_python_side_defaults_go_through_execute(self, clean_db: Engine) -> None:
        # credit_balances.updated_at has a Python default: only `execute` computes it.
        insert = insert_once("postgresql", BALANCES, ("customer_id", "credit_entitlement_id"))
        before = utcnow()
        with clean_db.begin() as conn:
            run_prebuilt(
                conn,
                insert,
                {"customer_id": "cus_1", "credit_entitlement_id": "ent_1", "chain_ok": True},
            )
            updated_at = conn.execute(select(BALANCES.c.updated_at)).scalar_one()
        assert updated_at >= before

    def test_sqlite_goes_through_execute(self, tmp_path: Any) -> None:
        from shared.db import make_engine
        from shared.models import Base

        engine = make_engine(f"sqlite:///{tmp_path / 'dev.db'}")
        Base.metadata.create_all(engine)
        insert = insert_once("sqlite", PAYMENTS, ("payment_id",), ("payment_id",))
        with engine.begin() as conn:
            assert run_prebuilt(conn, insert, payment_row("pay_s")).all() == [("pay_s",)]
            data = conn.execute(select(PAYMENTS.c.data)).scalar_one()
        assert data == payment_row("pay_s")["data"]
        engine.dispose()
