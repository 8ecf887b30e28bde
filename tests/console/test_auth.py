"""Signing in to the console: the form, the session cookie, CSRF, sign-out, one-time links."""

from __future__ import annotations

from flask import Flask, session
from flask.sessions import NullSession
from flask.testing import FlaskClient

from ingest import create_app
from shared.settings import Settings
from tests.console.conftest import csrf_token, sign_in
from tests.support import ADMIN_TOKEN


class TestSignIn:
    def test_signed_out_pages_redirect_to_the_sign_in_form(self, client: FlaskClient) -> None:
        answer = client.get("/console/events")
        assert answer.status_code == 302
        assert answer.headers["Location"] == "/console/login?next=/console/events"

    def test_the_sign_in_page_shows_no_navigation(self, client: FlaskClient) -> None:
        page = client.get("/console/login").get_data(as_text=True)
        assert 'name="token"' in page
        assert "Dead letters" not in page

    def test_wrong_token_is_refused_and_signs_nobody_in(self, client: FlaskClient) -> None:
        answer = sign_in(client, "not-the-token")
        assert answer.status_code == 401
        assert "not the admin token" in answer.get_data(as_text=True)
        assert client.get("/console/").status_code == 302

    def test_right_token_sets_an_httponly_samesite_cookie_on_the_console_path(
        self, client: FlaskClient
    ) -> None:
        answer = sign_in(client)
        assert answer.status_code == 302
        assert answer.headers["Location"] == "/console/"
        cookie = answer.headers["Set-Cookie"]
        assert cookie.startswith("dodo_console=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie
        assert "Secure" not in cookie
        assert ADMIN_TOKEN not in cookie
        assert client.get("/console/").status_code == 200

    def test_cookie_is_secure_when_the_request_came_over_tls(self, client: FlaskClient) -> None:
        token = csrf_token(client)
        answer = client.post(
            "/console/login",
            data={"token": ADMIN_TOKEN, "csrf_token": token},
            base_url="https://localhost",
            # Over HTTPS Flask-WTF also wants a same-origin Referer, as browsers send it.
            headers={"Referer": "https://localhost/console/login"},
        )
        assert "Secure" in answer.headers["Set-Cookie"]

    def test_next_is_followed_within_the_console_only(self, client: FlaskClient) -> None:
        token = csrf_token(client)
        answer = client.post(
            "/console/login",
            data={"token": ADMIN_TOKEN, "csrf_token": token, "next": "//evil.example/console/"},
        )
        assert answer.headers["Location"] == "/console/"

    def test_a_new_admin_token_signs_everyone_out(
        self, admin: FlaskClient, settings: Settings
    ) -> None:
        other = create_app(settings.model_copy(update={"admin_token": "another-token"}))
        try:
            stolen = admin.get_cookie("dodo_console", path="/console")
            assert stolen is not None
            client = other.test_client()
            client.set_cookie("dodo_console", stolen.value, path="/console")
            assert client.get("/console/").status_code == 302
        finally:
            other.extensions["dodo"].close()


class TestCsrf:
    def test_form_posted_without_its_csrf_token_is_refused(self, admin: FlaskClient) -> None:
        answer = admin.post("/console/dead-letters/retry", data={"scope": "matching"})
        assert answer.status_code == 400
        assert "CSRF" in answer.get_data(as_text=True)

    def test_sign_in_without_csrf_token_is_refused(self, client: FlaskClient) -> None:
        answer = client.post("/console/login", data={"token": ADMIN_TOKEN})
        assert answer.status_code == 400
        assert client.get("/console/").status_code == 302

    def test_webhooks_and_the_admin_api_take_no_csrf_token(self, client: FlaskClient) -> None:
        answer = client.post(
            "/api/dead-letters/retry",
            json={"all": True, "dry_run": True},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert answer.status_code == 200


class TestSignOut:
    def test_sign_out_ends_the_session(self, admin: FlaskClient) -> None:
        token = csrf_token(admin, "/console/")
        answer = admin.post("/console/logout", data={"csrf_token": token})
        assert answer.status_code == 302
        assert admin.get("/console/").status_code == 302


class TestOneTimeLink:
    def test_signs_in_once_then_is_refused(self, settings: Settings) -> None:
        app = create_app(settings.model_copy(update={"console_login_token": "once-abc"}))
        try:
            first = app.test_client()
            answer = first.get("/console/login?once=once-abc")
            assert answer.status_code == 302 and answer.headers["Location"] == "/console/"
            assert first.get("/console/").status_code == 200
            again = app.test_client().get("/console/login?once=once-abc")
            assert again.status_code == 401
        finally:
            app.extensions["dodo"].close()

    def test_wrong_or_unset_link_token_is_refused(self, client: FlaskClient) -> None:
        assert client.get("/console/login?once=guess").status_code == 401
        assert client.get("/console/").status_code == 302


class TestMounting:
    def test_console_enabled_off_leaves_no_console(self, settings: Settings) -> None:
        app = create_app(settings.model_copy(update={"console_enabled": False}))
        try:
            assert app.test_client().get("/console/login").status_code == 404
        finally:
            app.extensions["dodo"].close()

    def test_without_admin_token_the_console_answers_503(self, settings: Settings) -> None:
        app = create_app(settings.model_copy(update={"admin_token": None}))
        try:
            answer = app.test_client().get("/console/")
            assert answer.status_code == 503
            assert "ADMIN_TOKEN" in answer.get_data(as_text=True)
        finally:
            app.extensions["dodo"].close()


class TestOtherRoutes:
    def test_only_console_requests_open_a_session(self, app: Flask) -> None:
        """A webhook delivery or an API call never pays for reading a session cookie."""
        headers = {"Cookie": "dodo_console=garbage"}
        for path in ("/webhooks/dodo", "/api/events/msg_x", "/healthz"):
            with app.test_request_context(path, headers=headers):
                assert isinstance(session, NullSession), path
        with app.test_request_context("/console/", headers=headers):
            assert not isinstance(session, NullSession)
