"""Signing in to the console: ADMIN_TOKEN through a form, then a signed session cookie.

The token is only ever read from a POSTed form and compared in constant time; it is never put
in a URL, a log line or the cookie (which holds a fingerprint, so a new token signs everyone
out). Every POST carries Flask-WTF's CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, Request, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from ingest.console.blueprint import bp
from ingest.state import state
from shared.logs import get_logger
from shared.settings import Settings

log = get_logger("ingest.console")

COOKIE_NAME = "dodo_console"
SIGNED_IN = "signed_in"
# How long a used one-time sign-in link is remembered as used.
ONCE_MEMORY_SECONDS = 30 * 24 * 3600
PUBLIC_ENDPOINTS = frozenset({"console.login", "console.static"})

csrf = CSRFProtect()


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure whenever the request itself came over TLS.

    Only console requests open one: a webhook delivery or an API call pays nothing for it.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.path.startswith("/console/"):
            return self.make_null_session(app)
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        # Behind a TLS proxy, gunicorn's forwarded_allow_ips makes X-Forwarded-Proto count.
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def session_key(settings: Settings) -> str:
    if settings.console_secret_key:
        return settings.console_secret_key
    assert settings.admin_token is not None
    return hmac.new(
        settings.admin_token.encode(), b"dodo-webhooks console session", hashlib.sha256
    ).hexdigest()


def fingerprint(token: str) -> str:
    """What the cookie holds instead of the token: enough to notice that the token changed."""
    return hmac.new(token.encode(), b"dodo-webhooks console sign-in", hashlib.sha256).hexdigest()[
        :32
    ]


def configure_sessions(app: Flask, settings: Settings) -> None:
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH="/console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.console_session_hours),
        # Only the console's forms are checked (below); the webhook and the API take none.
        WTF_CSRF_CHECK_DEFAULT=False,
        # The CSRF token lives as long as the session that holds it.
        WTF_CSRF_TIME_LIMIT=None,
    )
    if settings.admin_token is not None:
        app.secret_key = session_key(settings)
    app.session_interface = ConsoleSessionInterface()
    csrf.init_app(app)


def signed_in() -> bool:
    token = state().settings.admin_token
    marker = session.get(SIGNED_IN)
    return (
        token is not None
        and isinstance(marker, str)
        and hmac.compare_digest(marker, fingerprint(token))
    )


def start_session(token: str) -> None:
    session.clear()
    session.permanent = True
    session[SIGNED_IN] = fingerprint(token)


@bp.before_request
def _guard() -> ResponseReturnValue | None:
    if state().settings.admin_token is None:
        return render_template(
            "console/message.html",
            title="Console not configured",
            message="Set ADMIN_TOKEN to sign in to the console.",
        ), 503
    if request.method == "POST":
        csrf.protect()
    if request.endpoint in PUBLIC_ENDPOINTS or signed_in():
        return None
    if request.method == "GET":
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    return render_template(
        "console/message.html", title="Signed out", message="Sign in again to do this."
    ), 401


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> ResponseReturnValue:
    """As the ingest everywhere: never a 500. A page, not the API's JSON."""
    if isinstance(exc, HTTPException):
        return exc
    log.error("console page failed", exc_info=exc, extra={"path": request.path})
    return render_template(
        "console/message.html",
        title="Temporarily unavailable",
        message="This page could not be shown; the error is in the ingest's log.",
    ), 503


@bp.errorhandler(CSRFError)
def _csrf_refused(exc: CSRFError) -> tuple[str, int]:
    log.warning("console form refused: %s", exc.description)
    return render_template(
        "console/message.html",
        title="Form refused",
        message=f"{exc.description} Reload the page and try again.",
    ), 400


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path of this site only."""
    default = url_for("console.overview")
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/console/"):
        return default
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    settings = state().settings
    token = settings.admin_token
    assert token is not None  # _guard answered 503 otherwise
    once = request.args.get("once")
    if request.method == "GET" and once:
        return _login_once(once, token)
    if request.method == "GET":
        if signed_in():
            return redirect(safe_next(request.args.get("next")))
        return render_template("console/login.html", next=request.args.get("next", ""))
    given = request.form.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        log.warning("console sign-in refused: wrong token")
        return render_template(
            "console/login.html",
            next=request.form.get("next", ""),
            error="That is not the admin token.",
        ), 401
    start_session(token)
    log.info("console sign-in")
    return redirect(safe_next(request.form.get("next")))


def _login_once(once: str, token: str) -> ResponseReturnValue:
    """A developer's one-click sign-in: the link `dodo-webhooks dev` prints works once."""
    ingest = state()
    expected = ingest.settings.console_login_token
    refused = "This sign-in link is not valid or was used already: sign in with the token."
    if expected is None or not hmac.compare_digest(once.encode(), expected.encode()):
        log.warning("console one-time sign-in refused")
        return render_template("console/login.html", next="", error=refused), 401
    used_key = "dodo-webhooks:console:login-once:" + hashlib.sha256(once.encode()).hexdigest()
    try:
        first_use = ingest.redis.set(used_key, "1", nx=True, ex=ONCE_MEMORY_SECONDS)
    except Exception:
        return render_template(
            "console/login.html",
            next="",
            error="Redis does not answer, so the link cannot be checked: sign in with the token.",
        ), 503
    if not first_use:
        log.warning("console one-time sign-in refused: used already")
        return render_template("console/login.html", next="", error=refused), 401
    start_session(token)
    log.info("console sign-in with the one-time link")
    return redirect(url_for("console.overview"))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    session.clear()
    return redirect(url_for("console.login"))


@bp.context_processor
def _signed_in_flag() -> dict[str, bool]:
    """Whether the page shows the navigation (never to someone signed out)."""
    return {"console_signed_in": signed_in()}
