"""The workers' database: one engine and session factory per process, made after the fork."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_sessionmaker
from shared.settings import Settings


class ProcessDatabase:
    """This process's session factory; a forked pool child never reuses its parent's sockets.

    Claims and applications share its pool on purpose: a claim that meets a connection the
    server dropped fails without counting an attempt, and SQLAlchemy then replaces every
    connection of the pool, so the application after it does not meet a dead one. (A pool of
    their own for claims, to commit them without waiting for the WAL flush, lost that: with
    connections terminated every 0.3 s the fault suite saw an event die of them.)
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._held: tuple[int, Engine, sessionmaker[Session]] | None = None

    def sessions(self) -> sessionmaker[Session]:
        if self._held is None or self._held[0] != os.getpid():
            engine = make_engine(self._settings.database_url, **engine_options(self._settings))
            self._held = (os.getpid(), engine, make_sessionmaker(engine))
        return self._held[2]

    def forget(self) -> None:
        """Drop the engine without closing it: after a fork its connections are the parent's."""
        self._held = None


def engine_options(config: Settings) -> dict[str, Any]:
    """PostgreSQL ends a worker's transaction left idle (its process frozen) before the lease.

    A worker stopped mid-task (SIGSTOP, a paused VM, a hung process) keeps its transaction
    open and with it the locks it took: the lease runs out, but the re-drive skips locked
    rows and a new claim would wait on them, so the event stayed `processing` for as long
    as the process stayed frozen. With this timeout the server drops that session, the
    locks go, and the lease does its job; if the process wakes up, its connection is gone
    and the claim fencing (attempt number) makes it stand down.
    """
    # No ping per checkout: it was a round trip per transaction. A connection the server
    # dropped fails the claim, the first statement of a task, which retries without counting
    # an attempt; the pool then replaces its connections.
    options: dict[str, Any] = {"pool_pre_ping": False}
    if not config.database_url.startswith("postgresql"):
        return options
    timeout_ms = max(1000, config.lease_seconds * 1000 // 2)
    options["connect_args"] = {"options": f"-c idle_in_transaction_session_timeout={timeout_ms}"}
    return options
