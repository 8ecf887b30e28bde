"""The console in real headless Chromium against a real gunicorn and Celery worker.

Debian's /usr/bin/chromium driven by playwright (`playwright install` cannot download a
browser here). A browser that cannot start fails the test; a failing test saves a
screenshot and prints its path.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from sqlalchemy import Engine

from shared.db import make_engine, make_sessionmaker
from tests.browser import launch_chromium
from tests.console.conftest import deliver
from tests.dead_letter_support import store_event
from tests.handlers.events import make_body
from tests.support import ADMIN_TOKEN, celery_worker, gunicorn, service_env

SCRIPT = "<script>window.__pwned = 1; alert('x')</script>"


@pytest.fixture(scope="module")
def stack(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """gunicorn and a Celery worker as a user runs them; the base URL and the log folder."""
    logs = tmp_path_factory.mktemp("console-stack")
    env = service_env(pg_url, redis_url)
    with gunicorn(env, logs) as url, celery_worker(env, logs, name="console"):
        yield url, logs


@pytest.fixture(scope="module")
def engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = launch_chromium(playwright)
    yield browser
    browser.close()


@pytest.fixture
def page(
    browser: Browser, stack: tuple[str, Path], request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Page]:
    context = browser.new_context(base_url=stack[0])
    page = context.new_page()
    page.set_default_timeout(15_000)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = dialogs  # type: ignore[attr-defined]
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        shot = tmp_path / f"{request.node.name}.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot of the failing page: {shot} (at {page.url})")
    context.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def sign_in(page: Page, token: str = ADMIN_TOKEN) -> None:
    page.goto("/console/")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def search(page: Page, query: str) -> None:
    page.get_by_role("searchbox", name="Search").fill(query)
    page.get_by_role("searchbox", name="Search").press("Enter")


class TestSignedOut:
    def test_shows_the_sign_in_page_and_no_data(self, page: Page, engine: Engine) -> None:
        webhook_id = unique("msg_hidden")
        store_event(engine, webhook_id, "payment.succeeded")
        for path in ("/console/", "/console/dead-letters", f"/console/events/{webhook_id}"):
            page.goto(path)
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            expect(page.get_by_role("navigation", name="Main")).to_have_count(0)
            assert webhook_id not in page.locator("main").inner_text()
            expect(page.locator("table")).to_have_count(0)

    def test_wrong_token_is_refused(self, page: Page) -> None:
        sign_in(page, "not-the-admin-token")
        expect(page.get_by_role("alert")).to_have_text("That is not the admin token.")
        page.goto("/console/events")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


class TestSignedIn:
    def test_find_a_dead_letter_see_the_dry_run_count_retry_and_see_it_processed(
        self, page: Page, engine: Engine
    ) -> None:
        payment_id, webhook_id = unique("pay"), unique("msg_dead")
        body = json.dumps(make_body("payment.succeeded", payment_id=payment_id))
        store_event(engine, webhook_id, "payment.succeeded", body=body)
        sign_in(page)
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        nav = page.get_by_role("navigation", name="Main")
        for label in ("Overview", "Events", "Dead letters", "Changes", "Customers"):
            expect(nav.get_by_role("link", name=label, exact=True)).to_be_visible()
        nav.get_by_role("link", name="Dead letters").click()
        page.get_by_label("Since").fill("1h")
        page.get_by_role("button", name="Filter").click()
        page.get_by_label(f"select {webhook_id}").check()
        page.get_by_role("button", name="Retry selected…").click()
        expect(page.locator("#dry-run-count")).to_have_text("1")
        page.get_by_role("button", name="Retry 1").click()
        expect(page.locator("#retry-requeued")).to_have_text("1")
        page.get_by_role("link", name=webhook_id).click()
        status = page.locator("#event-status")
        expect(status).not_to_have_text("dead")
        for _ in range(60):
            if status.inner_text().strip() == "processed":
                break
            page.wait_for_timeout(500)
            page.reload()
        expect(status).to_have_text("processed")
        expect(page.get_by_role("link", name=payment_id)).to_be_visible()

    def test_search_opens_a_payment_and_a_customer(self, page: Page, engine: Engine) -> None:
        payment_id, customer_id = unique("pay"), unique("cus")
        deliver(
            engine,
            make_sessionmaker(engine),
            "payment.succeeded",
            payment_id=payment_id,
            customer={"customer_id": customer_id, "email": "s@example.com", "name": "S"},
        )
        sign_in(page)
        search(page, payment_id)
        expect(page).to_have_url(f"/console/payments/{payment_id}")
        expect(page.get_by_role("heading", name=f"Payment {payment_id}")).to_be_visible()
        search(page, customer_id)
        expect(page).to_have_url(f"/console/customers/{customer_id}")
        expect(page.get_by_role("link", name=payment_id)).to_be_visible()

    def test_form_posted_without_its_csrf_token_is_refused(
        self, page: Page, engine: Engine
    ) -> None:
        webhook_id = unique("msg_csrf")
        store_event(engine, webhook_id, "refund.failed")
        sign_in(page)
        page.goto(f"/console/events/{webhook_id}")
        retry = page.locator("form", has=page.get_by_role("button", name="Retry…"))
        retry.locator("input[name=csrf_token]").evaluate("input => input.remove()")
        retry.get_by_role("button", name="Retry…").click()
        expect(page.get_by_role("heading", name="Form refused")).to_be_visible()
        page.goto(f"/console/events/{webhook_id}")
        expect(page.locator("#event-status")).to_have_text("dead")

    def test_script_in_a_customer_name_renders_as_text(self, page: Page, engine: Engine) -> None:
        customer_id = unique("cus")
        webhook_id = deliver(
            engine,
            make_sessionmaker(engine),
            "payment.succeeded",
            payment_id=unique("pay"),
            customer={"customer_id": customer_id, "email": "x@example.com", "name": SCRIPT},
        )
        sign_in(page)
        for path in (f"/console/customers/{customer_id}", f"/console/events/{webhook_id}"):
            page.goto(path)
            expect(page.get_by_text(SCRIPT).first).to_be_visible()
            assert page.locator("script").count() == 0
            assert page.evaluate("() => window.__pwned") is None
        assert page.dialogs == []  # type: ignore[attr-defined]

    def test_the_token_never_reaches_a_url_or_the_logs(
        self, page: Page, stack: tuple[str, Path]
    ) -> None:
        urls: list[str] = []
        page.on("request", lambda req: urls.append(req.url))
        sign_in(page)
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert urls and not [url for url in urls if ADMIN_TOKEN in url]
        logs = "".join(path.read_text(errors="replace") for path in stack[1].glob("*.log"))
        assert "console sign-in" in logs  # the sign-in was logged, without the token
        assert ADMIN_TOKEN not in logs


class TestBehindTls:
    def test_cookie_is_secure_when_the_tls_proxy_says_https(self, stack: tuple[str, Path]) -> None:
        """gunicorn trusts X-Forwarded-Proto from 127.0.0.1 (FORWARDED_ALLOW_IPS' default)."""
        plain = requests.get(f"{stack[0]}/console/login", timeout=10)
        proxied = requests.get(
            f"{stack[0]}/console/login", headers={"X-Forwarded-Proto": "https"}, timeout=10
        )
        assert "Secure" not in plain.headers["Set-Cookie"]
        assert "Secure" in proxied.headers["Set-Cookie"]
        assert "HttpOnly" in proxied.headers["Set-Cookie"]
