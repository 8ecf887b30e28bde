"""Standard Webhooks verification against every configured secret, over the raw bytes."""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.envelope import is_safe_webhook_id

SIGNED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


@dataclass(frozen=True)
class Rejection(Exception):
    """Why a delivery is refused: 400 for malformed headers or body, 401 for a bad signature."""

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
            webhook_ts = math.floor(float(signed["webhook-timestamp"]))
            return VerifiedDelivery(signed["webhook-id"], webhook_ts, signed)
        raise last
