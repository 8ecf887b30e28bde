"""ingest.perthread: one object per process and thread, for the ingest's held connections."""

from __future__ import annotations

import itertools
import os
import threading

from ingest.perthread import PerThread


def counter() -> PerThread[int]:
    made = itertools.count(1)
    return PerThread(lambda: next(made))


def test_each_thread_gets_its_own_and_keeps_it() -> None:
    objects = counter()
    mine = objects.get()
    assert objects.get() == mine
    theirs: list[int] = []
    thread = threading.Thread(target=lambda: theirs.extend([objects.get(), objects.get()]))
    thread.start()
    thread.join()
    assert theirs[0] == theirs[1] != mine
    assert objects.get() == mine


def test_drop_returns_the_object_and_the_next_get_makes_another() -> None:
    objects = counter()
    assert objects.held() is None and objects.drop() is None
    first = objects.get()
    assert objects.drop() == first
    assert objects.held() is None
    assert objects.get() != first


def test_a_forked_child_does_not_use_its_parents_object() -> None:
    objects = counter()
    parents = objects.get()
    pid = os.fork()
    if pid == 0:  # the child: reports by exit status, never returns into pytest
        fresh = objects.held() is None and objects.get() != parents
        os._exit(0 if fresh else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert objects.get() == parents
