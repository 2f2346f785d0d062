"""The client's boxcar: concurrent calls share RPCs, and each caller still gets its own outcome.

No processes here: the boxcar is driven with a fake `send` that records every car. Whether calls
share a car depends on who is queued when it leaves, so the fake RPC does not take "a little
while" (a loaded machine decides what that means): a gathering one stays in flight until every
caller still running is queued or in flight too, which is what a slow RPC under concurrency
looks like, every time.
"""

from __future__ import annotations

import threading

import pytest
from waiting import eventually

from engine import errors
from engine.client import Boxcar


#: `FakeRpc(gather=EVERY_CAR)`
EVERY_CAR = 1 << 30


class FakeRpc:
    """A `send` that answers `item * 10` and fails items that are negative (per-item errors) or
    whole cars that contain 'boom'. Its first `gather` cars each stay in flight until every
    caller of `run_threads(..., rpc=self)` that is still running is queued in the boxcar or in a
    car; later cars are answered at once."""

    def __init__(self, gather: int = 0) -> None:
        self.gather = gather
        self.box: Boxcar | None = None
        self.cars: list[list] = []
        self.in_flight = 0
        self.in_flight_max = 0
        self.items_in_flight = 0
        self.callers = 0  # callers of run_threads still running
        self._lock = threading.Lock()

    def boxcar(self, **kw) -> Boxcar:
        self.box = Boxcar(self, **kw)
        return self.box

    def gathered(self) -> bool:
        queued = self.box.waiting()
        with self._lock:
            return queued + self.items_in_flight >= self.callers

    def __call__(self, items):
        with self._lock:
            self.cars.append(list(items))
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
            self.items_in_flight += len(items)
            gather = len(self.cars) <= self.gather
        try:
            if gather:
                eventually(self.gathered, "every running caller to be queued or in a car")
            if "boom" in items:
                raise errors.Unavailable("the endpoint went away")
            return [errors.InvalidArgument(f"bad item {i}") if i < 0 else i * 10 for i in items]
        finally:
            with self._lock:
                self.in_flight -= 1
                self.items_in_flight -= len(items)


def run_threads(n, fn, rpc: FakeRpc | None = None, timeout_s: float = 60.0):
    out = [None] * n
    if rpc is not None:
        with rpc._lock:
            rpc.callers += n

    def body(i):
        try:
            out[i] = ("ok", fn(i))
        except Exception as e:  # noqa: BLE001 - recorded for the assertions
            out[i] = ("error", e)
        finally:
            if rpc is not None:
                with rpc._lock:
                    rpc.callers -= 1
    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a boxcar caller never woke up"
    return out


@pytest.mark.parametrize("cars_in_flight", [1, 2, 4])
def test_every_caller_gets_its_own_result_and_calls_share_cars(cars_in_flight):
    rpc = FakeRpc(gather=EVERY_CAR)
    box = rpc.boxcar(cars_in_flight=cars_in_flight)
    out = run_threads(64, lambda i: [box.call(i * 1000 + j) for j in range(20)], rpc)
    for i, (kind, results) in enumerate(out):
        assert kind == "ok" and results == [(i * 1000 + j) * 10 for j in range(20)]
    assert sum(len(c) for c in rpc.cars) == 64 * 20
    assert len(rpc.cars) < 64 * 20 / 4, "concurrent calls must share cars"
    assert rpc.in_flight_max <= cars_in_flight


def test_one_bad_item_does_not_fail_its_neighbours():
    rpc = FakeRpc(gather=EVERY_CAR)
    box = rpc.boxcar(cars_in_flight=1)
    out = run_threads(32, lambda i: box.call(-i if i % 4 == 0 else i), rpc)
    for i, (kind, value) in enumerate(out):
        if i % 4 == 0 and i:
            assert kind == "error" and type(value) is errors.InvalidArgument and f"bad item {-i}" in str(value)
        else:
            assert (kind, value) == ("ok", i * 10)
    assert any(len(c) > 1 and any(i < 0 for i in c) for c in rpc.cars), ("no bad item shared a car", rpc.cars)


def test_a_failed_rpc_fails_only_its_own_car_and_each_caller_gets_its_own_exception():
    rpc = FakeRpc(gather=EVERY_CAR)
    box = rpc.boxcar(cars_in_flight=1, items_max=4)
    out = run_threads(16, lambda i: box.call("boom" if i == 3 else i), rpc)
    failed = [value for kind, value in out if kind == "error"]
    assert failed and all(type(e) is errors.Unavailable for e in failed)
    assert len({id(e) for e in failed}) == len(failed), "each thread raises its own exception object"
    boom_car = next(c for c in rpc.cars if "boom" in c)
    assert len(failed) == len(boom_car) <= 4
    assert sum(1 for kind, _ in out if kind == "ok") == 16 - len(boom_car)


def test_cars_respect_their_byte_bound():
    rpc = FakeRpc(gather=EVERY_CAR)
    box = rpc.boxcar(cars_in_flight=1, bytes_max=100)
    out = run_threads(20, lambda i: box.call(i, 40), rpc)
    assert all(kind == "ok" for kind, _ in out)
    assert all(len(c) <= 2 for c in rpc.cars), rpc.cars
    assert any(len(c) == 2 for c in rpc.cars), ("the callers never shared a car", rpc.cars)
    out = run_threads(3, lambda i: box.call(i + 100, 1000), rpc)  # an item above the bound still travels, alone
    assert all(kind == "ok" for kind, _ in out)
    assert sorted(c for c in rpc.cars if c[0] >= 100) == [[100], [101], [102]], rpc.cars


def test_a_lone_caller_pays_one_rpc_per_call():
    rpc = FakeRpc()
    box = Boxcar(rpc)
    assert [box.call(i) for i in range(5)] == [0, 10, 20, 30, 40]
    assert rpc.cars == [[0], [1], [2], [3], [4]]


def test_a_closed_boxcar_refuses_new_calls():
    box = Boxcar(FakeRpc())
    box.close()
    with pytest.raises(errors.Closed):
        box.call(1)


def test_a_car_waits_briefly_for_the_callers_of_the_previous_one():
    """Callers woken by a returning car come back within moments; the next car waits for them
    (at most `linger_s`), so cars stay full instead of alternating half full.

    The first car gathers every caller; after it the RPC answers at once, so only lingering can
    fill a car. How long "moments" are is the machine's business: on a loaded one 32 woken
    threads take far longer than on an idle box, so the bound is generous (the last car, whose
    callers are partly done, waits it out: seconds of test time, not a verdict on the machine).
    With `linger_s=0` the same run sends cars of one or two."""
    rpc = FakeRpc(gather=1)
    box = rpc.boxcar(cars_in_flight=1, linger_s=2.0)
    run_threads(32, lambda i: [box.call(j) for j in range(30)], rpc)
    sizes = [len(c) for c in rpc.cars]
    assert sum(sizes) / len(sizes) > 16, sizes
