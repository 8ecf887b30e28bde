"""Fixtures for the console: an app on the test database, a signed-in client, stored events."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ingest import create_app
from shared.db import make_sessionmaker
from shared.models import EventStatus, Outcome
from shared.settings import Settings
from tests.dead_letter_support import store_event
from tests.handlers.events import T0, apply, make_body, make_event
from tests.support import ADMIN_TOKEN

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    app.extensions["dodo"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf_token(client: FlaskClient, path: str = "/console/login") -> str:
    """The CSRF token a page of the console carries in its forms."""
    match = CSRF.search(client.get(path).get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def sign_in(client: FlaskClient, token: str = ADMIN_TOKEN) -> Any:
    return client.post("/console/login", data={"token": token, "csrf_token": csrf_token(client)})


@pytest.fixture
def admin(client: FlaskClient) -> FlaskClient:
    """A client signed in to the console."""
    assert sign_in(client).status_code == 302
    return client


@pytest.fixture
def factory(clean_db: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(clean_db)


def deliver(
    engine: Engine,
    factory: sessionmaker[Session],
    event_type: str,
    *,
    when: datetime = T0,
    **data: Any,
) -> str:
    """An event recorded in the inbox and applied to the read model, as a worker does."""
    event, delivery = make_event(event_type, when=when, **data)
    outcome = apply(factory, event, delivery)
    body = json.dumps(make_body(event_type, when=event.timestamp, **data))
    store_event(
        engine,
        delivery.webhook_id,
        event_type,
        body=body,
        status=EventStatus.PROCESSED,
        attempts=1,
        last_error=None,
        outcome=Outcome(outcome),
    )
    return delivery.webhook_id


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test, so a fixture can tell that the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
