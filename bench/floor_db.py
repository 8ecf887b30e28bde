"""The end-to-end database floor: the drain's own statements, replayed from plain psycopg.

`capture` runs the product's drain functions (`claim_batch`, `apply_batch`) in this process
over the recorded backlog and keeps every statement they send, with its parameters, per
batch: the claim (autocommit) and the transaction (its savepoints, fenced finishes and the
handlers' writes). The backlog is then recorded again, identical, and `replay` sends the
same statements on C held psycopg connections, batch by batch, each transaction committed
once: what PostgreSQL and its driver cost for this work, without Python, SQLAlchemy or
Celery. Claims are replayed in their captured order (under a lock, the transactions not) so
that each claim takes the rows its captured transaction finishes; a transaction PostgreSQL
ends with a deadlock is run again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors
from sqlalchemy import event

from shared.catalog import EVENT_QUEUES
from shared.db import make_engine, make_sessionmaker, transaction
from workers.claims import apply_batch, claim_batch


@dataclass
class Batch:
    claim: list[tuple[str, Any]] = field(default_factory=list)
    apply: list[tuple[str, Any]] = field(default_factory=list)
    events: int = 0


def capture(db_url: str, batch_size: int) -> list[Batch]:
    """Drain every queue in this process, as one drain task would; the statements of each batch."""
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    sink: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _keep(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        sink.append((statement, parameters))

    batches: list[Batch] = []
    try:
        for queue in EVENT_QUEUES:
            while True:
                sink.clear()
                claims = claim_batch(factory, queue, batch_size, 300)
                if not claims:
                    break
                batch = Batch(claim=list(sink), events=len(claims))
                sink.clear()
                with transaction(factory) as session:
                    apply_batch(session, claims)
                batch.apply = list(sink)
                batches.append(batch)
    finally:
        engine.dispose()
    return batches


def replay(conninfo: str, batches: list[Batch], connections: int) -> float:
    """Send the captured batches on `connections` connections; the seconds it took."""
    conns = [psycopg.connect(conninfo, autocommit=True) for _ in range(connections)]
    lock = threading.Lock()
    position = iter(range(len(batches)))
    errors: list[BaseException] = []

    def run(conn: psycopg.Connection[Any]) -> None:
        try:
            while True:
                with lock:
                    index = next(position, None)
                    if index is None:
                        return
                    batch = batches[index]
                    for statement, params in batch.claim:
                        conn.execute(statement, params).fetchall()
                for _ in range(10):
                    try:
                        with conn.transaction():
                            for statement, params in batch.apply:
                                conn.execute(statement, params)
                    except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                        # Two batches locking balances in another order: PostgreSQL's verdict,
                        # paid by the floor as by the product (which reruns the batch).
                        continue
                    break
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for conn in conns:
        conn.close()
    if errors:
        raise errors[0]
    return elapsed
