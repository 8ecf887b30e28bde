"""The code's layout: the import rules of pyproject.toml hold, and one fact lives in one place."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from shared.catalog import HANDLED_TYPES, KIND_OF, KINDS, KNOWN_OTHER, queue_for
from shared.models import Dispute, Payment, Subscription
from workers.handlers import HANDLERS, ROUTES
from workers.schemas import MODELS, SCHEMAS

ROOT = Path(__file__).resolve().parent.parent


class TestImportRules:
    def test_lint_imports_keeps_every_contract(self) -> None:
        """cli > ingest | workers > shared, no Flask in workers or shared, no circles."""
        binary = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
        assert binary, "import-linter is not installed (pip install -e '.[test]')"
        result = subprocess.run(
            [binary, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert "3 kept, 0 broken" in result.stdout


class TestCatalogIsTheOneSource:
    def test_every_kind_has_one_schema_and_one_handler(self) -> None:
        assert set(MODELS) == set(KINDS) == set(HANDLERS)

    def test_schemas_routes_and_queues_follow_the_catalog(self) -> None:
        assert set(SCHEMAS) == set(ROUTES) == set(KIND_OF)
        for event_type, kind in KIND_OF.items():
            assert SCHEMAS[event_type] is MODELS[kind]
            assert ROUTES[event_type] is HANDLERS[kind]
            assert queue_for(event_type) == KINDS[kind].family

    def test_the_promised_thirty_are_all_routed(self) -> None:
        assert len(HANDLED_TYPES) == 30
        assert set(HANDLED_TYPES) <= set(ROUTES)
        assert not set(HANDLED_TYPES) & set(KNOWN_OTHER)


class TestRecordsDeriveFromTheirModels:
    def test_record_columns_are_the_models_own_key_first(self) -> None:
        assert Payment.record_columns()[0] == "payment_id"
        assert "last_event_at" not in Payment.record_columns()
        assert "data" not in Subscription.record_columns()
        assert Dispute.history is not None
        assert Dispute.history.event_columns() == ("dispute_id", "dispute_status", "dispute_stage")
