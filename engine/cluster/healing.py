"""Healing a cluster: wipe a node, follow its rebuild, replace a node by a new one.

Theory of operation
-------------------
`wipe_node` kills a node, deletes its data folder and starts it empty, under the operation lock
(`supervisor.Supervisor.operation`), so a concurrent `up` cannot start the node in between; the
node then rebuilds from its peers by gossip. `rebuild_status` is the status view
(`status.StatusView`) plus `complete`: every active node SERVING with no lag behind the writer's
PGCLs; `wait_rebuilt` polls it, bounded.

`replace_node` is a membership change: the replacement is added to the manifest (next free port
above every port the manifest names, a folder in the old node's AZ, `"replaces": old`), started,
and handed to the writer endpoint with the `ReplaceNode` admin RPC (`admin.WriterAdmin`), which
runs the two epoch steps; the launcher polls `MembershipStatus` for progress and, when the
change ends, retires the node that left (stops it, marks it in the manifest: `retired`, and
`replaced_by` when it was replaced). A replacement the endpoint refused outright, or that never
started, is retired at once, so `up` does not start it. Asking again after an interruption
(or after the endpoint restarted) resumes the same change. Nodes reach the new one through
`engine.cluster.addresses`.
"""

from __future__ import annotations

import os
import shutil
import time

from engine.cluster.admin import WriterAdmin, operator_token
from engine.cluster.manifest import (
    WRITER,
    ClusterError,
    add_node_entry,
    data_folder,
    load_manifest,
    locked,
    node_entry,
    save_manifest,
)
from engine.cluster.status import StatusView
from engine.cluster.supervisor import DOWN_TIMEOUT_S, READY_TIMEOUT_S, Supervisor, next_free_port
from engine.errors import InvalidArgument, Unavailable

#: How long `replace_node` lets the new node catch up by default (the endpoint's bound), and how
#: much longer the launcher waits for the endpoint's verdict before giving up on it.
REPLACE_TIMEOUT_S = 120.0
REPLACE_GRACE_S = 30.0
REPLACE_POLL_S = 0.25
#: Deadline of the ReplaceNode RPC: epoch step 1 tells every node, each bounded by the writer's
#: recovery deadline.
REPLACE_RPC_TIMEOUT_S = 60.0
#: Ports tried above the highest port of the manifest when a node is added.
PORT_SEARCH_MAX = 1000


class Healer:
    """Healing of the cluster `supervisor` runs (see the module docstring)."""

    def __init__(self, supervisor: Supervisor, view: StatusView) -> None:
        self.sup = supervisor
        self.view = view

    def _writer(self) -> WriterAdmin:
        return WriterAdmin(self.sup.address(WRITER), self.sup.tls(), operator_token(self.sup.folder))

    # --- rebuild ----------------------------------------------------------------------------
    def rebuild_status(self) -> dict:
        """`status()` plus `complete`: every active node is SERVING with no lag behind the
        writer's PGCLs. (The node's own `rebuild.active` flag is shown but not trusted: it can stay
        set after the writer's appends, rather than gossip, closed the last gap.)"""
        st = self.view.status()
        st["complete"] = bool(st["writer"].get("pgcl")) and all(n["health"] == "SERVING" and n.get("lag") == 0 for n in st["nodes"])
        return st

    def wait_rebuilt(self, timeout_s: float = READY_TIMEOUT_S, interval_s: float = 1.0, progress=None) -> dict:
        """Poll `rebuild_status()` until it is complete; ClusterError after `timeout_s`.
        `progress(status)` is called after each poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.rebuild_status()
            if progress is not None:
                progress(st)
            if st["complete"]:
                return st
            if time.monotonic() >= deadline:
                behind = [f"{n['id']} (lag {n.get('lag', '?')}, {n['health']})" for n in st["nodes"]
                          if n["health"] != "SERVING" or n.get("lag") != 0]
                raise ClusterError(f"rebuild not complete after {timeout_s:g} s: {', '.join(behind) or 'a rebuild is still active'}")
            time.sleep(interval_s)

    def wipe_node(self, node_id: str) -> None:
        """Kill a node, delete its data folder, start it empty: it rebuilds from its peers.
        Under the operation lock, so a concurrent `up` cannot start the node in between."""
        sup = self.sup
        with sup.operation("node wipe"):
            sup.crash(node_id)
            m = sup.manifest
            shutil.rmtree(data_folder(sup.folder, m, node_entry(m, node_id)), ignore_errors=True)
            sup.start(node_id)

    # --- membership change ------------------------------------------------------------------
    def _next_port(self, manifest: dict) -> int:
        """The first free port above every port the manifest names (its metrics port free too)."""
        return next_free_port(manifest, "a new node", PORT_SEARCH_MAX)

    def membership_status(self):
        """The writer endpoint's membership change state (`convert.MembershipChange`)."""
        return self._writer().membership_status()

    def replace_node(self, old: str, new: str, timeout_s: float = REPLACE_TIMEOUT_S, progress=None, *, on_change=None) -> dict:
        """Replace node `old` (say, failed for good) by a new node `new` in the same AZ, without
        stopping writes: add `new` to the manifest (next free port), start it, and have the
        writer endpoint run the change (epoch step 1 adds `new` as a second quorum set; once `new`
        holds every PG's durable chain, epoch step 2 drops `old`; if `old` was down and answers
        first, the change is reverted). Then the node that left is stopped and marked retired.

        `progress(fraction)` is called while `new` rebuilds (as in the embedded
        `replace_node`); `on_change(MembershipChange)` with the endpoint's full state. Returns a
        summary: replaced, reverted, seconds, epoch, members. Asking again after an interruption
        resumes the same change. ClusterError when it fails or times out."""
        from engine.transport import convert

        sup = self.sup
        convert.check_node_id(new)
        if new == WRITER:
            raise ClusterError(f"{WRITER!r} names the writer endpoint; pick another node id")
        health = sup.health(WRITER)
        if health != "SERVING":
            raise ClusterError(f"the writer endpoint is {health}; it runs the membership change, so start it first "
                               f"(`sixfold writer start --cluster {sup.folder}`)")
        added = False
        with locked(sup.folder):
            m = load_manifest(sup.folder)
            o = node_entry(m, old)
            if o.get("retired"):
                raise ClusterError(f"node {old} is retired already (replaced by {o.get('replaced_by') or 'another node'})")
            existing = next((n for n in m["nodes"] if n["id"] == new), None)
            if existing is None:
                entry = add_node_entry(m, new, o["az"], self._next_port(m), replaces=old)
                data = data_folder(sup.folder, m, entry)
                if os.path.exists(data) and os.listdir(data):
                    raise ClusterError(f"{data} exists and is not empty; move it away or pick another node id")
                save_manifest(sup.folder, m)
                added = True
            elif existing.get("replaces") != old or existing.get("retired"):
                raise ClusterError(f"node {new} already exists in this cluster; pick a new node id")
            entry = next(n for n in m["nodes"] if n["id"] == new)
        try:
            sup.start(new)
        except BaseException:
            if added:  # never became part of anything: retire it so `up` does not start it
                sup.terminate([new], DOWN_TIMEOUT_S)
                self._retire(new, None)
            raise
        entry = node_entry(sup.manifest, new)  # as started (a --netns cluster gives it its namespace's address)
        t0 = time.monotonic()
        deadline = t0 + timeout_s + REPLACE_GRACE_S
        try:
            change = self._begin_replace(old, new, entry, timeout_s, t0 + REPLACE_GRACE_S)
        except InvalidArgument:
            if added:  # refused outright (nothing changed): the new node goes again
                sup.terminate([new], DOWN_TIMEOUT_S)
                self._retire(new, None)
            raise
        while True:
            if on_change is not None:
                on_change(change)
            if change.phase != "rebuilding":
                break
            if progress is not None:
                progress(change.fraction)
            if time.monotonic() > deadline:
                raise ClusterError(f"the writer endpoint did not finish replacing {old} by {new} within {timeout_s:g} s")
            time.sleep(REPLACE_POLL_S)
            try:
                change = self.membership_status()
                if change.phase == "idle" or (change.old, change.new) != (old, new):
                    change = self._begin_replace(old, new, entry, timeout_s, deadline)  # the endpoint restarted: resume
            except Unavailable:
                continue  # the endpoint is down or recovering: keep asking until the deadline
        if change.phase == "failed":
            raise ClusterError(f"replacing {old} by {new} failed: {change.error}")
        leaving = old if change.phase == "replaced" else new
        sup.terminate([leaving], DOWN_TIMEOUT_S)
        self._retire(leaving, new if change.phase == "replaced" else None)
        return {"replaced": change.phase == "replaced", "reverted": change.phase == "reverted", "old": old, "new": new,
                "seconds": round(time.monotonic() - t0, 3), "epoch": change.epoch, "members": list(change.members)}

    def _begin_replace(self, old: str, new: str, entry: dict, timeout_s: float, deadline: float):
        """Ask the endpoint to run (or resume) the change; retries while it is unreachable."""
        while True:
            try:
                return self._writer().replace_node(old, new, entry["address"], entry["az"], timeout_s, REPLACE_RPC_TIMEOUT_S)
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(REPLACE_POLL_S)

    def _retire(self, node_id: str, replaced_by: str | None) -> None:
        sup = self.sup
        with locked(sup.folder):
            m = load_manifest(sup.folder)
            e = node_entry(m, node_id)
            e["retired"] = True
            e["pid"] = None
            if replaced_by:
                e["replaced_by"] = replaced_by
            save_manifest(sup.folder, m)
