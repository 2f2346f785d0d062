"""The helpers tests use to hold ports (engine.cluster.testing): they must not fail on their own.

A test that blocks a port to check the launcher's "port in use" error once failed itself with
EADDRINUSE: the random port had been closed a moment before by an earlier test's process and was
still in TIME_WAIT, which a plain bind refuses and the servers' own bind (SO_REUSEADDR) ignores.
"""

from __future__ import annotations

import socket

import pytest

from engine.cluster.supervisor import port_free
from engine.cluster.testing import hold_port


def port_in_time_wait() -> int:
    """A loopback port whose listening side closed a connection first: it is in TIME_WAIT now.

    The listener sets SO_REUSEADDR, as gRPC's and the metrics servers do; Linux lets a later bind
    with that flag past a TIME_WAIT socket only when the socket that left it had it too."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end (the listening port) enters TIME_WAIT
        client.recv(1)  # the FIN arrived
        client.close()
    return port


def test_a_held_port_is_busy_even_when_it_was_in_time_wait():
    port = port_in_time_wait()
    with socket.socket() as plain:
        with pytest.raises(OSError):  # what the old blocker did, and why it failed
            plain.bind(("127.0.0.1", port))
    with hold_port("127.0.0.1", port) as s:
        assert s.getsockname() == ("127.0.0.1", port)
        assert not port_free("127.0.0.1", port), "the launcher's check must see the held port as busy"
    assert port_free("127.0.0.1", port), "and free again once the block ends"
