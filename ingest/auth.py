"""The admin token: `Authorization: Bearer $ADMIN_TOKEN` on every `/api` route."""

from __future__ import annotations

import hmac

from flask import Response, jsonify, request

from ingest.state import state


def require_admin() -> tuple[Response, int] | None:
    """None when the request carries the admin token; otherwise the answer to give."""
    token = state().settings.admin_token
    if token is None:
        return jsonify(error="admin API not configured: set ADMIN_TOKEN"), 503
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return jsonify(error="missing or wrong bearer token"), 401
    return None
