"""The Alembic migrations (shared/migrations) against real PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from cli.db import alembic_config, upgrade
from shared.bodies import include_object, is_day
from shared.db import make_engine
from shared.models import Base
from tests.conftest import PG_ADMIN_URL
from tests.support import throwaway_database

INDEXES = text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")


def _table_of(index_sql: str) -> str:
    """`CREATE UNIQUE INDEX x ON public.t USING …` → t"""
    return index_sql.split(" ON ", 1)[1].split()[0].split(".")[-1]


class TestSchema:
    """The migrations build the schema the models describe."""

    def test_autogenerate_finds_nothing_to_change(self, pg_engine: Engine) -> None:
        with pg_engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": include_object})
            assert compare_metadata(context, Base.metadata) == []

    def test_every_index_is_the_models_partial_predicates_included(self, pg_engine: Engine) -> None:
        """Autogenerate does not compare an index's WHERE; PostgreSQL's own definition does."""
        with throwaway_database(PG_ADMIN_URL, "dodo_models", migrated=False) as url:
            engine = make_engine(url)
            try:
                Base.metadata.create_all(engine)
                with engine.connect() as conn:
                    from_models = {name: sql for name, sql in conn.execute(INDEXES)}
            finally:
                engine.dispose()
        with pg_engine.connect() as conn:
            migrated = {name: sql for name, sql in conn.execute(INDEXES)}
        migrated.pop("alembic_version_pkc")
        # The days' partitions (made at run time) each have their copy of the key's index.
        days = {name for name, sql in migrated.items() if is_day(_table_of(sql))}
        assert days and all(name.startswith("event_bodies_") for name in days)
        assert {k: v for k, v in migrated.items() if k not in days} == from_models


class TestEventSubjectsMigration:
    """0006 adds `customer_id` and `payment_id` without touching the rows already there."""

    def test_rows_recorded_before_keep_both_null_and_a_downgrade_removes_the_columns(
        self,
    ) -> None:
        with throwaway_database(PG_ADMIN_URL, "dodo_0006", migrated=False) as url:
            upgrade(url, "change_feed")
            engine = make_engine(url)
            try:
                with engine.begin() as conn:
                    conn.execute(
                        text(
                            "INSERT INTO webhook_events (webhook_id, type, status, attempts, body,"
                            " headers, webhook_ts, received_at) VALUES ('msg_old', 'payment."
                            "succeeded', 'processed', 1, 'x', '{}', 1, now())"
                        )
                    )
                upgrade(url, "event_subjects")
                with engine.connect() as conn:
                    row = conn.execute(
                        text("SELECT customer_id, payment_id FROM webhook_events")
                    ).one()
                assert tuple(row) == (None, None)
                command.downgrade(alembic_config(url), "change_feed")
                with engine.connect() as conn:
                    columns = conn.execute(
                        text(
                            "SELECT column_name FROM information_schema.columns"
                            " WHERE table_name = 'webhook_events'"
                        )
                    ).scalars()
                    assert {"customer_id", "payment_id"}.isdisjoint(columns)
                    kept = conn.execute(text("SELECT webhook_id FROM webhook_events")).scalars()
                    assert kept.all() == ["msg_old"]
            finally:
                engine.dispose()
