"""One object per process and thread, for connections held outside any pool (the ingest's)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerThread(Generic[T]):
    """This thread's object, made by `make` on first use.

    One made in another process is not this one's to use (a connection opened before a fork,
    in gunicorn's master, say): `get` makes a new one in its place.
    """

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._local = threading.local()

    def get(self) -> T:
        held = self.held()
        if held is None:
            held = self._make()
            self._local.value, self._local.pid = held, os.getpid()
        return held

    def held(self) -> T | None:
        """This thread's object, if this process made one; never makes one."""
        local = self._local
        return local.value if getattr(local, "pid", None) == os.getpid() else None

    def drop(self) -> T | None:
        """Forget this thread's object (the next `get` makes another) and return it to close."""
        held = self.held()
        self._local.value, self._local.pid = None, None
        return held
