"""Waiting in tests: on a condition, with one generous deadline, never for "long enough".

The suite runs on a loaded two-core machine shared with other jobs. A test that sleeps for a
while and then looks, or that gives a condition a few seconds, measures the machine: it passes
on an idle box and fails on a busy one. Here every wait polls the condition it is about and
returns as soon as it holds, so the deadline costs nothing when things go well; the deadline
(`DEADLINE_S`, 60 s, `SIXFOLD_TEST_DEADLINE_S` to change it) only decides how long a test that
is really broken takes to say so, and its message says what was awaited and what was seen last.

Import it from a test module as `from waiting import eventually` (pytest puts `tests/` on the
path: the test folder has no `__init__.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_S = float(os.environ.get("SIXFOLD_TEST_DEADLINE_S") or 60.0)
INTERVAL_S = 0.02


def eventually(predicate: Callable[[], T], what: str, *, timeout_s: float = DEADLINE_S, interval_s: float = INTERVAL_S,
               ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `predicate()` until it returns something true, and return that.

    An exception of a class in `ignoring` counts as "not yet" (say, Unavailable while a node
    restarts); any other propagates. After `timeout_s` an AssertionError names `what` was
    awaited and the last value (or exception) seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            last = predicate()
        except ignoring as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last seen: {last!r})")
        time.sleep(interval_s)


def until_done(call: Callable[[], T], what: str, *, retry_on: tuple[type[BaseException], ...],
               timeout_s: float = DEADLINE_S, interval_s: float = 0.05) -> T:
    """Call `call()` until it returns without raising one of `retry_on`; return its result.

    For "writes resume": the first write that is not refused. After `timeout_s` an
    AssertionError names `what` and carries the last error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except retry_on as e:
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last error: {e!r})") from e
        time.sleep(interval_s)
