"""The Alembic migrations of the schema in `shared.models`; `dodo-webhooks db upgrade` runs them."""

from pathlib import Path

MIGRATIONS = Path(__file__).parent
