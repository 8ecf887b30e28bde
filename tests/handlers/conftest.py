from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_sessionmaker


@pytest.fixture
def factory(clean_db: Engine) -> sessionmaker[Session]:
    """Sessions on the emptied test database (real PostgreSQL)."""
    return make_sessionmaker(clean_db)
