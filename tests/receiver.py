"""A merchant's receiver of the test's own: verifies each change's signature, records it.

`python -m tests.receiver PORT SECRET LOG`; `POST /_mode` with `ok`, `500` or `slow:<s>`
switches how it answers. Each delivery is one JSON line in LOG: its `webhook-id`, whether
the signature verified, and the change.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

PORT, SECRET, LOG = int(sys.argv[1]), sys.argv[2], sys.argv[3]
state = {"mode": "ok"}
lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/_mode":
            state["mode"] = body.decode()
            self._answer(200, b"mode set")
            return
        mode = state["mode"]
        if mode.startswith("slow:"):
            time.sleep(float(mode.removeprefix("slow:")))
        try:
            payload = Webhook(SECRET).verify(body, dict(self.headers))
            verified = True
        except Exception:
            payload, verified = json.loads(body), False
        with lock, open(LOG, "a") as log:
            record = {"webhook_id": self.headers["webhook-id"], "verified": verified, "mode": mode}
            log.write(json.dumps({**record, "body": payload}) + "\n")
        if mode == "500":
            self._answer(500, b"receiver failing " + b"x" * 5000)
        else:
            self._answer(204, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
