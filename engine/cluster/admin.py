"""Admin clients of a running cluster: the writer endpoint's KV admin RPCs and the nodes' admin calls.

Theory of operation
-------------------
`WriterAdmin(address, tls)` makes one call at a time to the writer endpoint's `KV` service (`Status`,
`MembershipStatus`, `ReplaceNode`), each on a channel of its own that the call opens and closes,
with the deadline the caller gives, and the caller's token in its metadata (the launcher passes
the local operator's, `operator_token`): the launcher asks rarely, from short-lived commands, and must
not keep a connection (or the client's boxcar threads) alive in between. Errors come back as the
Sixfold class the endpoint raised (`convert.error_from_rpc`), so `Unavailable` means the endpoint
is down or still recovering and the caller may ask again.

`NodeAdmin(addresses)` reaches the storage nodes' admin calls (corrupt, scrub, set_faults,
state) through a `GrpcTransport` opened for the call and closed after it; `addresses` is a
callable, so a node added by a membership change is found on the next call.

In a secure cluster both speak mutual TLS as the operator (`tls`, an
`engine.security.tls.TlsConfig`; None for an insecure cluster).

The key-value API itself is `engine.connect` (`engine.client`), not this module.
"""

from __future__ import annotations

from collections.abc import Callable

import os

import grpc

#: Deadline of one status RPC, to the writer endpoint or to a node.
STATUS_RPC_TIMEOUT_S = 2.0


class WriterAdmin:
    """Admin calls to the writer endpoint at `address` (see the module docstring)."""

    def __init__(self, address: str, tls=None, token: str | None = None) -> None:
        from engine.security.users import bearer

        self.address = address
        self.tls = tls
        self._metadata = bearer(token) if token else None

    def call(self, rpc: str, request, timeout_s: float):
        """One call to the endpoint's KV service; Sixfold errors as raised there."""
        from engine.proto import kv_pb2_grpc
        from engine.transport import convert

        from engine.security.tls import secure_channel

        with secure_channel(self.address, self.tls) as ch:
            try:
                return getattr(kv_pb2_grpc.KVStub(ch), rpc)(request, timeout=timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                raise convert.error_from_rpc(e, where=f"writer endpoint {self.address}") from None

    def status(self, timeout_s: float = STATUS_RPC_TIMEOUT_S * 2) -> dict:
        """The endpoint's volume status (`WriterEndpoint.status`, as `db.status()` has it)."""
        from engine.proto import kv_pb2
        from engine.transport import convert

        return convert.status_from_pb(self.call("Status", kv_pb2.StatusRequest(), timeout_s))

    def membership_status(self, timeout_s: float = STATUS_RPC_TIMEOUT_S * 2):
        """The endpoint's membership change state (`convert.MembershipChange`)."""
        from engine.proto import kv_pb2
        from engine.transport import convert

        return convert.membership_change_from_pb(self.call("MembershipStatus", kv_pb2.MembershipStatusRequest(), timeout_s))

    def replace_node(self, old: str, new: str, new_address: str, new_az: str, change_timeout_s: float, timeout_s: float):
        """Ask the endpoint to run (or resume) replacing `old` by `new`; returns the change's
        state at once (`convert.MembershipChange`). `change_timeout_s` bounds the catch-up (the
        endpoint's), `timeout_s` this RPC."""
        from engine.transport import convert

        request = convert.replace_node_request_to_pb(old, new, new_address, new_az, change_timeout_s)
        return convert.membership_change_from_pb(self.call("ReplaceNode", request, timeout_s))


def operator_token(folder: str | os.PathLike) -> str | None:
    """The token the launcher's admin calls carry: the folder's operator token (the launcher
    acts for the local operator), else $SIXFOLD_TOKEN, else none."""
    from engine.security.users import default_token, operator_token as read_operator_token

    return read_operator_token(folder) or default_token(None)


class NodeAdmin:
    """Admin calls to the storage nodes (see the module docstring)."""

    def __init__(self, addresses: Callable[[], dict[str, str]], tls: Callable[[], object] | None = None,
                 volume: Callable[[], str] | None = None) -> None:
        self._addresses = addresses
        self._tls = tls or (lambda: None)
        self._volume = volume

    def transport(self, source: str = "chaos", **options):
        """A GrpcTransport to every node (admin calls: corrupt, scrub, set_faults, state...);
        the caller closes it."""
        from engine.transport.grpc_client import GrpcTransport

        options.setdefault("tls", self._tls())
        if self._volume is not None:
            options.setdefault("volume_id", self._volume())
        return GrpcTransport(self._addresses(), source=source, **options)

    def _call(self, fn):
        t = self.transport()
        try:
            return fn(t)
        finally:
            t.close()

    def corrupt(self, node_id: str, pg: int, lsn: int | None = None, bit: int = 0) -> int | None:
        """Flip a bit of a stored record on a node; returns the LSN hit (None: nothing there)."""
        return self._call(lambda t: t.corrupt(node_id, pg, lsn, bit))

    def scrub(self, node_id: str) -> int:
        """Make a node scrub every record now; returns the corrupt records it found."""
        return self._call(lambda t: t.scrub(node_id, 0))

    def set_faults(self, node_id: str, rules=None):
        """Replace a node's transport fault rules (`engine.transport.convert.FaultRules`;
        None clears them)."""
        from engine.transport.convert import FaultRules

        return self._call(lambda t: t.set_faults(node_id, rules or FaultRules()))
