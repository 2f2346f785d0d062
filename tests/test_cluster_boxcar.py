"""The client's boxcar: concurrent calls share RPCs, and each caller still gets its own outcome.

No processes here: the boxcar is driven with a fake `send` that records every car.
"""

from __future__ import annotations

import threading
import time

import pytest

from engine import errors
from engine.client import Boxcar


class FakeRpc:
    """A `send` that takes a little while, answers `item * 10`, and fails items that are
    negative (per-item errors) or whole cars that contain 'boom'."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.cars: list[list] = []
        self.in_flight = 0
        self.in_flight_max = 0
        self._lock = threading.Lock()

    def __call__(self, items):
        with self._lock:
            self.cars.append(list(items))
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if "boom" in items:
                raise errors.Unavailable("the endpoint went away")
            return [errors.InvalidArgument(f"bad item {i}") if i < 0 else i * 10 for i in items]
        finally:
            with self._lock:
                self.in_flight -= 1


def run_threads(n, fn, timeout_s=30.0):
    out = [None] * n
    def body(i):
        try:
            out[i] = ("ok", fn(i))
        except Exception as e:  # noqa: BLE001 - recorded for the assertions
            out[i] = ("error", e)
    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a boxcar caller never woke up"
    return out


@pytest.mark.parametrize("cars_in_flight", [1, 2, 4])
def test_every_caller_gets_its_own_result_and_calls_share_cars(cars_in_flight):
    rpc = FakeRpc()
    box = Boxcar(rpc, cars_in_flight=cars_in_flight)
    out = run_threads(64, lambda i: [box.call(i * 1000 + j) for j in range(20)])
    for i, (kind, results) in enumerate(out):
        assert kind == "ok" and results == [(i * 1000 + j) * 10 for j in range(20)]
    assert sum(len(c) for c in rpc.cars) == 64 * 20
    assert len(rpc.cars) < 64 * 20 / 4, "concurrent calls must share cars"
    assert rpc.in_flight_max <= cars_in_flight


def test_one_bad_item_does_not_fail_its_neighbours():
    rpc = FakeRpc(delay_s=0.01)
    box = Boxcar(rpc, cars_in_flight=1)
    out = run_threads(32, lambda i: box.call(-i if i % 4 == 0 else i))
    for i, (kind, value) in enumerate(out):
        if i % 4 == 0 and i:
            assert kind == "error" and type(value) is errors.InvalidArgument and f"bad item {-i}" in str(value)
        else:
            assert (kind, value) == ("ok", i * 10)


def test_a_failed_rpc_fails_only_its_own_car_and_each_caller_gets_its_own_exception():
    rpc = FakeRpc(delay_s=0.01)
    box = Boxcar(rpc, cars_in_flight=1, items_max=4)
    out = run_threads(16, lambda i: box.call("boom" if i == 3 else i))
    failed = [value for kind, value in out if kind == "error"]
    assert failed and all(type(e) is errors.Unavailable for e in failed)
    assert len({id(e) for e in failed}) == len(failed), "each thread raises its own exception object"
    boom_car = next(c for c in rpc.cars if "boom" in c)
    assert len(failed) == len(boom_car) <= 4
    assert sum(1 for kind, _ in out if kind == "ok") == 16 - len(boom_car)


def test_cars_respect_their_byte_bound():
    rpc = FakeRpc(delay_s=0.005)
    box = Boxcar(rpc, cars_in_flight=1, bytes_max=100)
    out = run_threads(20, lambda i: box.call(i, 40))
    assert all(kind == "ok" for kind, _ in out)
    assert all(len(c) <= 2 for c in rpc.cars), rpc.cars
    out = run_threads(3, lambda i: box.call(i, 1000))  # an item above the bound still travels, alone
    assert all(kind == "ok" for kind, _ in out)


def test_a_lone_caller_pays_one_rpc_per_call():
    rpc = FakeRpc(delay_s=0)
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
    (at most `linger_s`), so cars stay full instead of alternating half full."""
    rpc = FakeRpc(delay_s=0.002)
    box = Boxcar(rpc, cars_in_flight=1, linger_s=0.05)
    run_threads(32, lambda i: [box.call(j) for j in range(30)])
    sizes = [len(c) for c in rpc.cars]
    assert sum(sizes) / len(sizes) > 16, sizes
