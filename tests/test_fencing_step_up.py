"""Epochs left on a minority by failed writer opens do not fence the writer (engine.core.fencing).

A writer cut off with n1 and n2 seals them one epoch higher at every failed attempt to open; the
writer that then opens from n3..n6 is below them, and their StaleEpoch used to fence it for good.
The decision is pure and checked here against brute force over every 6-node membership of seven
ids and every joint membership, every subset of nodes: the writer steps up only when its nodes
meet every write quorum (so no writer sealed one above it), and a step holds only when the clean
sealed nodes meet every write quorum (so no writer synced one below the target). Then the writer
itself on real nodes (in-process, LMDB): failed opens, a real newer writer, and a writer that
opens between the probe and the step.
"""

from __future__ import annotations

from itertools import combinations

import pytest

from engine.core.constants import EPOCH_MAX, EPOCH_STEP_MAX, FLAG_PUT, WRITE_QUORUM
from engine.core.fencing import (
    FENCE,
    RESEND,
    STEP_UP,
    SYNC,
    Decision,
    decide_epoch_refusal,
    on_epoch_refusal,
    refusal_needs_probe,
    step_up_holds,
    trace_epoch,
)
from engine.core.types import Geometry, Membership, default_nodes
from engine.errors import EpochBehind, StaleEpoch, Unavailable
from engine.head.writer import Writer, WriterOptions
from engine.node.service import StorageNode
from engine.transport.faults import FaultyTransport, NetworkFaults
from engine.transport.inprocess import InProcessTransport, Registry

NODES = tuple(f"n{i}" for i in range(1, 8))
SIX_SETS = tuple(tuple(n for n in NODES if n != out) for out in NODES)
PLAIN = tuple(Membership(0, six) for six in SIX_SETS)
JOINT = tuple(
    Membership(1, six, tuple(new if n == old else n for n in six))
    for six in SIX_SETS for new in NODES if new not in six for old in six
)
EVERY = PLAIN + JOINT
SUBSETS = tuple(frozenset(c) for size in range(len(NODES) + 1) for c in combinations(NODES, size))
E = 3  # the writer's epoch in the pure tests


def is_write_quorum(nodes: frozenset, m: Membership) -> bool:
    """Brute force, without the core: four of every quorum set."""
    return all(len(nodes & set(qs)) >= WRITE_QUORUM for qs in m.quorum_sets)


def write_quorums(m: Membership) -> list[frozenset]:
    members = frozenset(m.all_nodes)
    return [s for s in SUBSETS if s <= members and is_write_quorum(s, m)]


@pytest.mark.parametrize("m", EVERY, ids=lambda m: "+".join("".join(q) for q in m.quorum_sets))
def test_step_up_only_when_our_nodes_meet_every_write_quorum(m):
    quorums = write_quorums(m)
    members = frozenset(m.all_nodes)
    for accepting in (s for s in SUBSETS if s <= members):
        # the others hold epochs failed opens (or a newer writer) left, one node unreachable at times
        others = sorted(members - accepting)
        for unreachable in [None, *others[:1]]:
            epochs = {n: E for n in accepting}
            epochs.update({n: E + 2 + i for i, n in enumerate(others) if n != unreachable})
            d = decide_epoch_refusal(StaleEpoch("x"), E, E, epochs, m)
            if not is_write_quorum(accepting, m):
                assert d == Decision(FENCE)
                continue
            # the safety fact the step rests on: no write quorum avoids the nodes still at E
            assert all(q & accepting for q in quorums)
            if len(epochs) == len(accepting):
                assert d == Decision(RESEND)  # nobody answering is above us
            else:
                assert d == Decision(STEP_UP, max(epochs.values()) + 1)


@pytest.mark.parametrize("m", EVERY, ids=lambda m: "+".join("".join(q) for q in m.quorum_sets))
def test_a_step_holds_only_when_the_clean_sealed_nodes_meet_every_write_quorum(m):
    quorums = write_quorums(m)
    members = frozenset(m.all_nodes)
    for sealed in (s for s in SUBSETS if s <= members):
        for traced in (s for s in SUBSETS if s <= sealed):
            traces = {n: (E + 1 if n in traced else E) for n in sealed}
            holds = step_up_holds(E, traces, m)
            clean = sealed - traced
            assert holds == is_write_quorum(clean, m)
            if holds:
                # another writer's sync quorum would have met a clean sealed node, which shows it
                assert all(q & clean for q in quorums)


def test_the_simple_cases_and_the_bounds():
    m = Membership(0, NODES[:6])
    for sent in range(1, 5):
        for current in range(sent, 5):
            assert decide_epoch_refusal(EpochBehind("x"), sent, current, None, None) == Decision(SYNC)
            assert refusal_needs_probe(StaleEpoch("x"), sent, current) == (sent == current)
            if sent < current:
                assert decide_epoch_refusal(StaleEpoch("x"), sent, current, None, None) == Decision(RESEND)
    # without a probe a StaleEpoch at the current epoch can only fence (the old answer)
    assert decide_epoch_refusal(StaleEpoch("x"), E, E, None, None) == Decision(FENCE)
    assert on_epoch_refusal(StaleEpoch("x"), E, E) == FENCE
    at_e = {n: E for n in NODES[2:6]}
    # two refusing nodes at different epochs: one step, above both
    assert decide_epoch_refusal(StaleEpoch("x"), E, E, {**at_e, "n1": 9, "n2": 12}, m) == Decision(STEP_UP, 13)
    # nodes outside the membership do not count (n7 is not a member)
    assert decide_epoch_refusal(StaleEpoch("x"), E, E, {**at_e, "n7": 99}, m) == Decision(RESEND)
    assert decide_epoch_refusal(StaleEpoch("x"), E, E, {**{n: E for n in NODES[2:5]}, "n7": E, "n1": 9}, m) == Decision(FENCE)
    # the bounds: a target the nodes at E would refuse, or past EPOCH_MAX, fences
    assert decide_epoch_refusal(StaleEpoch("x"), E, E, {**at_e, "n1": E + EPOCH_STEP_MAX - 1}, m) == Decision(STEP_UP, E + EPOCH_STEP_MAX)
    assert decide_epoch_refusal(StaleEpoch("x"), E, E, {**at_e, "n1": E + EPOCH_STEP_MAX}, m) == Decision(FENCE)
    top = {n: EPOCH_MAX - 1 for n in NODES[2:6]}
    assert decide_epoch_refusal(StaleEpoch("x"), EPOCH_MAX - 1, EPOCH_MAX - 1, {**top, "n1": EPOCH_MAX - 1}, m) == Decision(RESEND)
    assert decide_epoch_refusal(StaleEpoch("x"), EPOCH_MAX - 1, EPOCH_MAX - 1, {**top, "n1": EPOCH_MAX}, m) == Decision(FENCE)
    assert trace_epoch(None, ()) == 0 and trace_epoch(4, (2, 7)) == 7


# --- the writer, on real nodes ---------------------------------------------------------------
VOLUME_ID = "00000000-0000-4000-8000-000000000088"


class Six:
    def __init__(self, path) -> None:
        self.path = path
        self.geometry = Geometry(2)
        self.infos = list(default_nodes())
        self.registry = Registry()
        self.nodes = {}
        for info in self.infos:
            node = StorageNode(str(path / info.id), info, self.geometry, VOLUME_ID, durable=False)
            self.nodes[info.id] = node
            self.registry.set(info.id, node)
        self.writers = []

    def writer(self, reach=None, transport_wrap=None) -> Writer:
        faults = NetworkFaults(seed=88)
        if reach is not None:
            faults.partition((("writer", *reach), tuple(n for n in self.nodes if n not in reach)))
        transport = FaultyTransport(InProcessTransport(self.registry, "writer"), faults)
        if transport_wrap:
            transport = transport_wrap(transport)
        w = Writer(transport, self.infos, self.geometry, WriterOptions(local_az="a", write_timeout_s=0.5), background=False)
        w.faults = faults
        self.writers.append(w)
        return w

    def fail_opens(self, times: int, reach=("n1", "n2")) -> None:
        """A writer cut off with a minority tries to open `times` times (each seals it one higher)."""
        for _ in range(times):
            w = self.writer(reach)
            with pytest.raises(Unavailable):
                w.open()

    def put(self, w: Writer, key: bytes, value: bytes) -> int:
        lsn, ticket = w.submit(((FLAG_PUT, key, value),))
        for _round in range(3):
            for n in list(w.links):
                w.send_once(w.links[n])
        return lsn

    def close(self) -> None:
        for w in self.writers:
            w.abandon()
        for node in self.nodes.values():
            node.close()


@pytest.fixture
def six(tmp_path):
    s = Six(tmp_path)
    yield s
    s.close()


def epochs(six: Six) -> dict[str, int]:
    return {n: node.store.epoch for n, node in six.nodes.items()}


def test_a_writer_steps_over_epochs_failed_opens_left_on_a_minority(six):
    w = six.writer()
    w.open()
    six.put(w, b"a", b"1")
    # the writer loses n1 and n2; a writer cut off with them tries to open five times
    w.faults.partition((("writer", "n3", "n4", "n5", "n6"), ("n1", "n2")))
    six.put(w, b"b", b"2")
    six.fail_opens(5)
    assert epochs(six) == {"n1": w.epoch + 5, "n2": w.epoch + 5, "n3": w.epoch, "n4": w.epoch, "n5": w.epoch, "n6": w.epoch}
    before = w.epoch
    w.faults.heal()  # n1 and n2 come back, at epochs above the writer's: they refuse it
    six.put(w, b"c", b"3")
    assert w.fenced is None, w.fenced
    assert w.epoch == before + 6
    assert set(epochs(six).values()) == {before + 6}
    lsn = six.put(w, b"d", b"4")
    assert w.ledger.vdl >= lsn
    assert [w.get(k, quorum=True) for k in (b"a", b"b", b"c", b"d")] == [b"1", b"2", b"3", b"4"]
    assert all(node.store.membership.epoch == before + 6 for node in six.nodes.values())
    # n1 and n2 caught up with the writer's records at the new epoch
    assert w.get(b"d") == b"4" and all(scl >= 0 for scl in six.nodes["n1"].store.state().scls)


def test_a_real_newer_writer_still_fences_the_old_one(six):
    old = six.writer()
    old.open()
    six.put(old, b"k", b"old")
    six.fail_opens(3)  # epochs above ours on n1, n2 as well: the newer writer opens above them
    new = six.writer()
    new.open()
    assert new.epoch > old.epoch
    six.put(old, b"k", b"from-the-fenced-writer")
    assert old.fenced and "newer writer" in old.fenced
    assert old.epoch < new.epoch
    with pytest.raises(StaleEpoch):
        old.check_usable()
    assert new.get(b"k", quorum=True) == b"old"
    six.put(new, b"k", b"new")
    assert new.fenced is None and new.get(b"k", quorum=True) == b"new"


class _OpensAnotherWriterAtFirstSeal:
    """The old writer's transport: its first seal (the step up) lets another writer, cut off from
    n1 and n2, open from n3..n6 first and log a write: the race between probe and step."""

    def __init__(self, inner, six: Six, box: dict) -> None:
        self._inner, self._six, self._box = inner, six, box

    def seal(self, node, epoch):
        if self._box.get("armed") and "other" not in self._box:
            other = self._box["other"] = self._six.writer(("n3", "n4", "n5", "n6"))
            other.open()
            self._box["lsn"] = self._six.put(other, b"k", b"from-the-other-writer")
            assert other.ledger.vdl >= self._box["lsn"]  # acknowledged
        return self._inner.seal(node, epoch)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_writer_that_opens_between_the_probe_and_the_step_fences_the_old_one(six):
    box: dict = {}
    w = six.writer(transport_wrap=lambda t: _OpensAnotherWriterAtFirstSeal(t, six, box))
    w.open()
    six.put(w, b"k", b"first")
    w.faults.partition((("writer", "n3", "n4", "n5", "n6"), ("n1", "n2")))
    six.fail_opens(4)
    w.faults.heal()
    box["armed"] = True
    six.put(w, b"k", b"from-the-old-writer")  # refused by n1: probe (a quorum at our epoch), then step
    assert "other" in box
    # the other writer synced n3..n6 before our seal: its membership there is the trace
    assert w.fenced and "did not hold" in w.fenced
    # the write the other writer acknowledged is what a new writer reads
    fresh = six.writer()
    fresh.open()
    assert fresh.get(b"k", quorum=True) == b"from-the-other-writer"


def test_a_spec_writer_candidate_opens_a_new_volume_at_once_and_never_one_a_writer_holds(six):
    """A deployment spec's writer starts as a candidate (engine.cluster.locate): restarted after
    a reader took over, it must not fence that reader. On a volume no writer ever opened (no
    node knows a membership) it opens at once (`open_new`); a reader's candidate never does
    (it would race the spec's writer); and once a writer holds the lease, neither goes."""
    from engine.head.failover import Candidate

    transport = InProcessTransport(six.registry, "candidate")
    # A lease of a minute: "a writer holds it" must not depend on how fast this machine runs.
    spec_writer = Candidate(transport, six.infos, open_new=True, lease_s=60.0)
    reader = Candidate(transport, six.infos, lease_s=60.0)
    lapsed, why = spec_writer.check()
    assert lapsed and "a new volume" in why, why
    assert reader.check() == (False, "no node answered with a membership")
    w = six.writer()
    w.open()
    assert not spec_writer.check()[0] and not reader.check()[0], "a writer holds the lease now"
