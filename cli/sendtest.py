"""`dodo-webhooks send-test`: sign a realistic sample of a Dodo event and POST it."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from cli.dev import DEFAULT_DATA_DIR, DEV_ENV_FILE, read_env_file
from cli.errors import CommandError
from shared.settings import parse_secrets

DEFAULT_URL = "http://127.0.0.1:8000/webhooks/dodo"
_ENVELOPE_KEYS = ("business_id", "type", "timestamp", "data")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser(
        "send-test",
        help="sign a realistic sample event and send it to the ingest",
        description=(
            "Build a realistic sample of a Dodo event type (from the official SDK's models), "
            "sign it with Standard Webhooks and POST it. The URL and secret default to the ones "
            "`dodo-webhooks dev` wrote in its data dir."
        ),
        epilog=(
            "examples:\n"
            "  dodo-webhooks send-test payment.succeeded\n"
            "  dodo-webhooks send-test subscription.cancelled --set data.customer.email=a@b.co\n"
            "  dodo-webhooks send-test payment.failed --set status=failed --json\n"
            "  dodo-webhooks send-test --list"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("event_type", nargs="?", help="e.g. payment.succeeded (see --list)")
    send.add_argument(
        "--url", help=f"the ingest's webhook URL (default: dev's, else {DEFAULT_URL})"
    )
    send.add_argument(
        "--secret",
        help="whsec_… signing secret (default: DODO_PAYMENTS_WEBHOOK_KEY, else dev's test secret)",
    )
    send.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field: data.status=cancelled (a path without data. means data.…); "
        'JSON values are decoded (42, null, true, "42"); repeatable',
    )
    send.add_argument("--webhook-id", help="the webhook-id header (default: a new msg_… id)")
    send.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"where `dodo-webhooks dev` keeps its settings (default ./{DEFAULT_DATA_DIR})",
    )
    send.add_argument("--json", action="store_true", help="print the result as a JSON object")
    send.add_argument(
        "--dry-run", action="store_true", help="print the signed request instead of sending it"
    )
    send.add_argument("--list", action="store_true", help="list the event types Dodo's SDK knows")
    send.set_defaults(run=cmd_send_test)


def new_webhook_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "msg_" + "".join(secrets.choice(alphabet) for _ in range(27))


def override_path(key: str) -> str:
    return key if key.split(".")[0] in _ENVELOPE_KEYS else f"data.{key}"


def resolve_target(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """URL, secret and admin token: options first, then the environment, then dev's file."""

    dev = read_env_file(Path(args.data_dir) / DEV_ENV_FILE)
    url = args.url or dev.get("DODO_WEBHOOKS_URL") or DEFAULT_URL
    given = (
        args.secret
        or os.environ.get("DODO_PAYMENTS_WEBHOOK_KEY", "").strip()
        or dev.get("DODO_PAYMENTS_WEBHOOK_KEY", "")
    )
    if not given:
        raise CommandError(
            "no signing secret: pass --secret whsec_…, set DODO_PAYMENTS_WEBHOOK_KEY, "
            "or start `dodo-webhooks dev` (which writes one)"
        )
    try:
        secret = parse_secrets(given)[0]
    except ValueError as exc:
        source = "--secret" if args.secret else "DODO_PAYMENTS_WEBHOOK_KEY"
        raise CommandError(f"{source}: {exc}") from None
    token = os.environ.get("ADMIN_TOKEN", "").strip() or dev.get("ADMIN_TOKEN") or None
    return url, secret, token


def build_request(
    event_type: str, overrides: list[str], webhook_id: str, secret: str
) -> tuple[bytes, dict[str, str]]:
    from cli.samples import parse_override, sample_event

    parsed: dict[str, Any] = {}
    for assignment in overrides:
        try:
            key, value = parse_override(assignment)
        except ValueError as exc:
            raise CommandError(f"--set: {exc}") from None
        parsed[override_path(key)] = value
    try:
        event = sample_event(event_type, overrides=parsed)
    except Exception as exc:
        # The SDK's own model refused the sample: an override of the wrong shape.
        first = str(exc).strip().splitlines()
        raise CommandError(
            f"--set: Dodo's {event_type} model refuses the result: "
            f"{first[0] if first else type(exc).__name__}"
            + (f" — {first[1].strip()}" if len(first) > 1 else "")
        ) from None
    body = json.dumps(event, separators=(",", ":"))
    now = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "user-agent": "dodo-webhooks-send-test",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, now, body),
    }
    return body.encode(), headers


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:

    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status), answer.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = getattr(reason, "strerror", None) or str(reason)
        hint = " — is `dodo-webhooks dev` (or the ingest) running?"
        raise CommandError(f"could not reach {url}: {why}{hint}") from None


def cmd_send_test(args: argparse.Namespace) -> int:
    from cli.samples import sdk_event_types
    from shared.catalog import HANDLED

    known = sdk_event_types()
    if args.list:
        handled = {t for types in HANDLED.values() for t in types}
        if args.json:
            print(json.dumps([{"type": t, "handled": t in handled} for t in known]))
        else:
            for event_type in known:
                print(f"{event_type:<40} {'handled' if event_type in handled else 'ignored'}")
        return 0
    if not args.event_type:
        raise CommandError("give an event type, e.g. `send-test payment.succeeded` (see --list)")
    if args.event_type not in known:
        print(
            f"warning: Dodo's SDK does not know {args.event_type!r}; sending a minimal envelope "
            "anyway (the ingest must accept it: it is stored and ignored)",
            file=sys.stderr,
        )

    url, secret, token = resolve_target(args)
    webhook_id = args.webhook_id or new_webhook_id()
    body, headers = build_request(args.event_type, args.overrides, webhook_id, secret)
    if args.dry_run:
        if args.json:
            print(json.dumps({"url": url, "headers": headers, "body": json.loads(body)}))
        else:
            print(f"POST {url}")
            for name, value in headers.items():
                print(f"{name}: {value}")
            print()
            print(body.decode())
        return 0

    status, text = post(url, body, headers)
    try:
        answer: Any = json.loads(text)
    except ValueError:
        answer = text
    ok = 200 <= status < 300
    if args.json:
        print(
            json.dumps(
                {
                    "url": url,
                    "type": args.event_type,
                    "webhook_id": webhook_id,
                    "http_status": status,
                    "response": answer,
                }
            )
        )
        return 0 if ok else 1
    summary = answer.get("status") or answer.get("error") if isinstance(answer, dict) else text
    print(f"{status} {summary or '-'}: {args.event_type}, webhook-id {webhook_id}")
    if ok and token:
        parts = urlsplit(url)
        print(
            f'  curl -H "Authorization: Bearer {token}" '
            f"{parts.scheme}://{parts.netloc}/api/events/{webhook_id}"
        )
    if status == 401:
        print("  (is the secret the one the ingest was started with?)", file=sys.stderr)
    return 0 if ok else 1
