"""Standard Webhooks verification against every configured secret, over the raw bytes."""

from __future__ import annotations

import binascii
import re
import time
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.envelope import is_safe_webhook_id

SIGNED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
# Standard Webhooks: `webhook-timestamp` is integer seconds since the epoch.
TOLERANCE_SECONDS = 5 * 60
_INTEGER = re.compile(r"-?[0-9]+")
# Longer than any instant near now (year 33658) is far outside the window: it is not parsed.
_MAX_DIGITS = 12
_FAR = 10**_MAX_DIGITS


@dataclass(frozen=True)
class Rejection(Exception):
    """Why a delivery is refused: 400 malformed headers or body, 401 a missing or bad signature
    or a timestamp outside the window, 413 too large, 415 compressed."""

    status: int
    reason: str


@dataclass(frozen=True)
class VerifiedDelivery:
    webhook_id: str
    webhook_ts: int
    headers: dict[str, str]


class Verifier:
    def __init__(self, secrets: list[str]) -> None:
        self._webhooks = [Webhook(secret) for secret in secrets]

    def verify(self, body: bytes, headers: dict[str, str]) -> VerifiedDelivery:
        signed = {name: headers.get(name, "") for name in SIGNED_HEADERS}
        if not all(signed.values()):
            raise Rejection(401, "missing webhook-id, webhook-timestamp or webhook-signature")
        if not is_safe_webhook_id(signed["webhook-id"]):
            raise Rejection(400, "webhook-id must be 1-255 printable ASCII characters")
        webhook_ts = read_timestamp(signed["webhook-timestamp"])
        last = Rejection(401, "no signature matches any configured secret")
        for webhook in self._webhooks:
            try:
                webhook.verify(body, signed, json_parse=False)
            except WebhookVerificationError as exc:
                reason = str(exc)
                if "timestamp" in reason.lower() or "header" in reason.lower():
                    # Timestamp checks do not depend on the secret: no use trying the others.
                    raise Rejection(401, reason) from None
                last = Rejection(401, "no signature matches any configured secret")
                continue
            # The library raises these on hostile input, not only its own error.
            except UnicodeDecodeError:
                raise Rejection(400, "body is not UTF-8") from None
            except (ValueError, binascii.Error, TypeError, OverflowError):
                raise Rejection(400, "malformed webhook-signature header") from None
            return VerifiedDelivery(signed["webhook-id"], webhook_ts, signed)
        raise last


def read_timestamp(value: str, *, now: float | None = None) -> int:
    """`webhook-timestamp` as seconds: 400 when it is not an integer, 401 outside ±5 minutes."""
    text = value.strip()
    if not _INTEGER.fullmatch(text):
        raise Rejection(400, "malformed webhook-timestamp: expected integer seconds since 1970")
    seconds = int(text) if len(text) <= _MAX_DIGITS else (-_FAR if text[0] == "-" else _FAR)
    now = time.time() if now is None else now
    if seconds < now - TOLERANCE_SECONDS:
        raise Rejection(401, "Message timestamp too old")
    if seconds > now + TOLERANCE_SECONDS:
        raise Rejection(401, "Message timestamp too new")
    return seconds
