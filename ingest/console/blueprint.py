"""The console's blueprint, its templates and static files, and the headers of every page."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

# Nothing but our own stylesheet and forms: an injected <script> would not run even if a
# payload ever slipped past the escaping.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@bp.after_request
def _page_headers(answer: Response) -> Response:
    answer.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    answer.headers["X-Frame-Options"] = "DENY"
    answer.headers["X-Content-Type-Options"] = "nosniff"
    # Ids in URLs never travel to another site; same-origin still sends the Referer that
    # Flask-WTF checks on every form posted over HTTPS.
    answer.headers["Referrer-Policy"] = "same-origin"
    answer.headers.setdefault("Cache-Control", "no-store")
    return answer


@bp.app_template_filter("console_when")
def _when(value: object) -> str:
    """A time as the console shows it: UTC to the second."""
    if value is None or value == "":
        return "—"
    if not isinstance(value, str | datetime):
        return str(value)
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        when = value
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("console_age")
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    whole = int(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if whole >= size:
            return f"{whole // size}{unit} {whole % size // (size // 60 if size > 60 else 1)}" + (
                "h" if unit == "d" else "m" if unit == "h" else "s"
            )
    return f"{whole}s"


@bp.app_template_filter("console_json")
def _json(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, indent=2, ensure_ascii=False)
    return "—" if value is None else str(value)
