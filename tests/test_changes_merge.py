"""The merge of per-PG logs into units (engine.core.changes), against the writer-order model: the
writer gives each unit consecutive LSNs, its last record CPL (a request record when it has a
request id), each record backlinked to the previous of its PG; split by PG and merged back, in
rounds from any commit position up to any frontier, the units come out exactly as written."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.changes import chain_break, merge_units
from engine.core.constants import FLAG_CPL, FLAG_DELETE, FLAG_PUT, FLAG_REQUEST


class Rec(NamedTuple):
    lsn: int
    prev_lsn: int
    pg: int
    flags: int
    key: bytes


unit_ops = st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=5)
units_strategy = st.lists(st.tuples(unit_ops, st.booleans(), st.integers(0, 3)), min_size=0, max_size=25)


def write(units, P=4):
    """The writer's order: (records per PG, the model: [(CPL, [(pg, key, flags)])])."""
    lsn, last = 0, [0] * P
    streams = [[] for _ in range(P)]
    model = []
    for n, (ops, with_request, gap) in enumerate(units):
        lsn += gap  # a new writer after a recovery starts past the cut range
        recs = [(pg, b"k%d.%d" % (n, i), FLAG_PUT if put else FLAG_DELETE) for i, (pg, put) in enumerate(ops)]
        if with_request:
            recs.append((n % P, b"rid%d" % n, FLAG_PUT | FLAG_REQUEST))
        for i, (pg, key, flags) in enumerate(recs):
            lsn += 1
            flags |= FLAG_CPL if i == len(recs) - 1 else 0
            streams[pg].append(Rec(lsn, last[pg], pg, flags, key))
            last[pg] = lsn
        model.append((lsn, [(pg, key, flags) for pg, key, flags in recs if not flags & FLAG_REQUEST]))
    return streams, model


def shape(units):
    return [(cpl, [(r.pg, r.key, r.flags & ~FLAG_CPL) for r in recs]) for cpl, recs in units]


@settings(max_examples=300, deadline=None)
@given(units_strategy, st.integers(1, 7), st.data())
def test_merged_rounds_give_the_units_in_writer_order_exactly_once(units, ops_max, data):
    streams, model = write(units)
    cpls = [0] + [cpl for cpl, _ in model]
    start = data.draw(st.sampled_from(cpls), label="start")
    end = max(cpls)
    got, position, stuck = [], start, False
    while True:
        # A frontier anywhere above the position (a PG's fetch cut short), or the end (after a
        # round that gave nothing: a reader then reads on until a unit is whole).
        upto = data.draw(st.integers(position, end), label="frontier") if position < end and not stuck else end
        above = [[r for r in s if position < r.lsn <= upto + 3] for s in streams]  # fetched a little past it
        out, nxt = merge_units(above, position, upto, ops_max)
        assert all(position < cpl <= upto for cpl, _ in out)
        assert nxt == (out[-1][0] if out else position)
        got += out
        if nxt == position and upto == end:
            break
        stuck, position = nxt == position, nxt
    expected = [(cpl, [(pg, key, flags) for pg, key, flags in ops]) for cpl, ops in model if cpl > start]
    assert shape(got) == expected


@settings(max_examples=200, deadline=None)
@given(units_strategy, st.data())
def test_a_segment_missing_any_record_is_a_broken_chain(units, data):
    streams, _model = write(units)
    pg = data.draw(st.integers(0, 3))
    records = streams[pg]
    after = data.draw(st.sampled_from([0] + [r.lsn for r in records]))
    above = [r for r in records if r.lsn > after]
    tail = records[-1].lsn if records else 0
    assert chain_break(above, after, tail) is None, "the whole chain"
    assert chain_break(above, after) is None
    if above:
        i = data.draw(st.integers(0, len(above) - 1))
        holed = above[:i] + above[i + 1:]
        assert chain_break(holed, after, tail) is not None, f"record {above[i].lsn} missing"
