"""A reader-endpoint session keeps the highest read point its replies carried; a reply's read
point is a number from the network, so one above any valid LSN (a broken or hostile reader) is
not kept: kept, it would make every later read of the session wait for it and fail."""

from __future__ import annotations

import threading

from engine.client import RemoteBackend
from engine.core.constants import LSN_VALID_MAX


class Reply:
    def __init__(self, read_point: int) -> None:
        self.read_point = read_point


def session(point: int) -> RemoteBackend:
    b = RemoteBackend.__new__(RemoteBackend)  # the session bookkeeping alone, no channel
    b._session, b._point, b._point_lock = True, point, threading.Lock()
    return b


def test_a_read_point_above_every_valid_lsn_is_not_kept():
    b = session(10)
    b._session_read(lambda: Reply(2**64 - 1))
    assert b.session_point == 10
    b._session_read(lambda: Reply(LSN_VALID_MAX))
    assert b.session_point == LSN_VALID_MAX


def test_an_answer_from_below_the_session_is_asked_again_and_a_newer_one_taken():
    b = session(100)
    answers = iter([Reply(90), Reply(95), Reply(120)])
    assert b._session_read(lambda: next(answers)).read_point == 120
    assert b.session_point == 120
