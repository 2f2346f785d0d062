"""A hypothesis state machine drives the embedded cluster (real LMDB) through writes and faults
and checks it against a dict model: no acknowledged write is ever lost, and every read returns a
value some linearization allows (an indeterminate write may or may not have happened).

Faults stay inside the failure budget the protocol promises to survive: at most three segments
impaired at a time (down, wiped and not yet rebuilt, or holding a corrupt record not yet repaired).
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import engine
from engine.core.placement import protection_group_of
from engine.node.service import wait_until

KEYS = [b"k%d" % i for i in range(6)]
NODES = ["n1", "n2", "n3", "n4", "n5", "n6"]
AZ_OF = {"n1": "a", "n2": "a", "n3": "b", "n4": "b", "n5": "c", "n6": "c"}
IMPAIRED_MAX = 3


class EmbeddedCluster(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sixfold-stateful-")
        self.db = engine.open(self.dir, write_timeout_s=0.3, gossip_interval_s=0.02, scrub_interval_s=0.05, protection_groups=4)
        self.P = 4
        #: per key, the values a read may return (None: absent)
        self.possible = {k: {None} for k in KEYS}
        #: indeterminate writes of the current writer, in submission order: [(key, value)]
        self.pending: list[tuple[bytes, bytes | None]] = []
        self.down: set[str] = set()
        self.damaged: set[str] = set()  # wiped or corrupted, until healed
        self.counter = 0

    # --- helpers ----------------------------------------------------------------------------
    def impaired(self) -> set[str]:
        return self.down | self.damaged

    def value(self) -> bytes:
        self.counter += 1
        return b"v%d" % self.counter

    def apply_write(self, ops) -> None:
        try:
            if len(ops) == 1 and ops[0][1] is not None:
                self.db.put(ops[0][0], ops[0][1])
            elif len(ops) == 1:
                self.db.delete(ops[0][0])
            else:
                with self.db.batch() as b:
                    for k, v in ops:
                        b.put(k, v) if v is not None else b.delete(k)
        except engine.WriteIndeterminate:
            for k, v in ops:
                self.possible[k].add(v)
            self.pending.extend(ops)
            return
        except engine.Unavailable:
            return  # refused before logging: nothing happened
        # Acknowledged: it is durable, and so is every earlier write of this writer (lower LSNs).
        for k, v in self.pending + list(ops):
            self.possible[k] = {v}
        self.pending = []

    def observe(self, key: bytes, got) -> None:
        assert got in self.possible[key], f"read {key!r} -> {got!r}, allowed {self.possible[key]!r}"
        self.possible[key] = {got} | {v for k, v in self.pending if k == key}

    # --- writes -----------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS))
    def put(self, key):
        self.apply_write([(key, self.value())])

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key):
        self.apply_write([(key, None)])

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=2, max_size=4, unique=True), deletes=st.integers(0, 3))
    def batch(self, keys, deletes):
        self.apply_write([(k, None if i < deletes and i < len(keys) - 1 else self.value()) for i, k in enumerate(keys)])

    # --- reads ------------------------------------------------------------------------------
    @precondition(lambda self: len(self.down) <= 3)
    @rule(key=st.sampled_from(KEYS), quorum=st.booleans())
    def get(self, key, quorum):
        try:
            got = self.db.get(key, quorum=quorum)
        except engine.Unavailable:
            assert len(self.impaired()) >= 3, "reads must work with at most AZ+1 impaired"
            return
        self.observe(key, got)

    @precondition(lambda self: len(self.down) <= 3)
    @rule()
    def scan(self):
        try:
            seen = dict(self.db.scan())
        except engine.Unavailable:
            assert len(self.impaired()) >= 3
            return
        for k in KEYS:
            self.observe(k, seen.get(k))

    # --- faults (inside the budget) ---------------------------------------------------------
    @precondition(lambda self: len(self.impaired()) < IMPAIRED_MAX)
    @rule(node=st.sampled_from(NODES))
    def stop_node(self, node):
        if node not in self.down:
            self.db.cluster.stop_node(node)
            self.down.add(node)

    @precondition(lambda self: len(self.impaired()) <= IMPAIRED_MAX - 2)
    @rule(az=st.sampled_from(["a", "b", "c"]))
    def stop_az(self, az):
        nodes = {n for n, a in AZ_OF.items() if a == az}
        if len(self.impaired() | nodes) <= IMPAIRED_MAX:
            self.db.cluster.stop_az(az)
            self.down |= nodes

    @precondition(lambda self: self.down)
    @rule(data=st.data())
    def start_node(self, data):
        node = data.draw(st.sampled_from(sorted(self.down)))
        self.db.cluster.start_node(node)
        self.down.discard(node)

    @precondition(lambda self: len(self.impaired()) < IMPAIRED_MAX)
    @rule(node=st.sampled_from(NODES))
    def wipe_node(self, node):
        if node not in self.down:
            self.db.cluster.wipe_node(node)
            self.damaged.add(node)

    @precondition(lambda self: len(self.impaired()) < IMPAIRED_MAX)
    @rule(node=st.sampled_from(NODES), key=st.sampled_from(KEYS), bit=st.integers(0, 2000))
    def corrupt(self, node, key, bit):
        if node not in self.down:
            self.db.cluster.corrupt(node, protection_group_of(key, self.P), None, bit)
            self.damaged.add(node)

    @rule()
    def heal(self):
        for node in sorted(self.down):
            self.db.cluster.start_node(node)
        self.down.clear()
        self.settle()

    @precondition(lambda self: len(self.down) <= 2)
    @rule()
    def crash_writer(self):
        try:
            self.db.cluster.crash_writer()
        except engine.Unavailable:
            self.heal()
            self.db.cluster.crash_writer()
        # The new writer decided the fate of every pending write; the next read of each key tells.
        self.pending = []

    def settle(self) -> None:
        """Wait until every segment is whole again (the damaged ones rebuilt or repaired)."""
        try:
            self.db.put(b"settle", b"x")  # carries the newest VDL hint to every node
        except engine.Unavailable:
            pass

        def whole():
            st_ = self.db.status()
            scls = {str(n.get("scl")) for n in st_["nodes"] if n["up"]}
            return len(scls) == 1 and all(n["up"] for n in st_["nodes"])

        assert wait_until(whole, 20), "segments did not converge after healing"
        self.damaged.clear()

    @invariant()
    def vdl_never_goes_back(self):
        vdl = self.db.status()["vdl"]
        assert vdl >= getattr(self, "_vdl", 0)
        self._vdl = vdl

    def teardown(self):
        try:
            self.heal()
            for k in KEYS:
                self.observe(k, self.db.get(k))  # no acknowledged write lost
                self.observe(k, self.db.get(k, quorum=True))
        finally:
            self.db.close()
            shutil.rmtree(self.dir, ignore_errors=True)


EmbeddedCluster.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEmbeddedCluster = EmbeddedCluster.TestCase
