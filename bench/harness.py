"""One client harness for every key-value system the benchmarks compare.

Theory of operation
-------------------
A system under test is reduced to a *client factory*: `factory(thread_index) -> Client`, where a
`Client` holds two thread-safe callables, `put(key, value)` and `get(key) -> value or None`. The
factory may hand every thread the same client (Sixfold's `Database`, whose boxcar coalesces
concurrent calls) or one client per thread (a gRPC channel per thread for etcd): that choice
belongs to the system's adapter, and the harness never sees it. Sixfold and etcd are therefore
driven by the same threads, the same keys, the same 100-byte values and the same clock.

`run(...)` starts N client threads at once; each performs operations back to back (a closed
loop: one outstanding operation per client) until the time budget or its share of the
operation budget is spent, and records, per operation, when it started, how long it took, and
whether it failed. Operations that start during the warm-up are done but not counted. Ops/s
counts operations *completed* inside the measured window; latency statistics cover operations
*started* inside it (so the tail of operations still in flight at the deadline is waited for and
counted in the latencies, never dropped). A failed operation is recorded with its exception
class and the client carries on; a client stops after `ERRORS_MAX_PER_CLIENT` failures, so a
dead system cannot make the loop spin.

`events` are (offset_s, name, callable) run on a separate thread at fixed offsets from the start
(the AZ-loss scenario kills processes that way); their actual times are returned, so a caller
can split the samples into before and after.

Keys are unique per run: `prefix/tag/client/sequence`, where the tag of each client comes from
the seeded generator; gets pick keys from a pre-loaded set with a per-client generator derived
from the seed. Every loop here is bounded in time and count.

Besides p50/p99/max, each result carries the latency at every quantile of `CDF_QUANTILES` (the
minimum, every percent, 99.9% and the maximum): about a hundred numbers, enough to draw a latency
CDF (bench/report.py) without keeping the samples in the JSON.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

VALUE_BYTES = 100
#: Upper bounds on everything the harness does (TIGER_STYLE: put a limit on everything).
OPS_MAX_DEFAULT = 1_000_000
SECONDS_MAX = 600.0
CLIENTS_MAX = 1024
ERRORS_MAX_PER_CLIENT = 1_000
WARMUP_S_DEFAULT = 0.5
PRELOAD_SECONDS_MAX = 120.0
JOIN_GRACE_S = 60.0  # how long after the deadline an in-flight operation may still take
#: The quantiles of `Result.latency_quantiles_ms`: 0 (the minimum), 0.01 .. 0.99, 0.999 and 1 (the
#: maximum). A JSON file that carries rows with them also carries this list (`latency_quantiles`).
CDF_QUANTILES = tuple(i / 100 for i in range(100)) + (0.999, 1.0)
assert len(CDF_QUANTILES) == 102 and list(CDF_QUANTILES) == sorted(set(CDF_QUANTILES))


@dataclass(frozen=True)
class Client:
    """What the harness needs of a system: two thread-safe callables."""

    put: Callable[[bytes, bytes], object]
    get: Callable[[bytes], bytes | None]


ClientFactory = Callable[[int], Client]


@dataclass
class Sample:
    start_s: float  # from the start of the run
    latency_s: float
    ok: bool


@dataclass
class Result:
    """What one run measured. Latencies in milliseconds; `ops_s` counts records when each
    operation carries several (`records_per_op`)."""

    name: str
    clients: int
    seed: int
    window_s: float
    ops: int
    errors: int
    error_kinds: dict[str, int]
    ops_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    records_per_op: int = 1
    samples: list[Sample] = field(default_factory=list, repr=False)
    events: list[dict] = field(default_factory=list)
    clients_stuck: int = 0  # threads still inside an operation JOIN_GRACE_S after the deadline
    #: latency (ms, rounded to the microsecond) at each of CDF_QUANTILES; empty when nothing succeeded
    latency_quantiles_ms: tuple[float, ...] = ()

    def row(self) -> dict:
        """JSON-ready summary (no samples)."""
        return {
            "name": self.name, "clients": self.clients, "seed": self.seed, "window_s": round(self.window_s, 3),
            "ops": self.ops, "errors": self.errors, "error_kinds": dict(sorted(self.error_kinds.items())),
            "ops_s": self.ops_s, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
            "records_per_op": self.records_per_op, "events": self.events, "clients_stuck": self.clients_stuck,
            "latency_quantiles_ms": list(self.latency_quantiles_ms),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile of an ascending sequence (0.0 when it is empty)."""
    assert 0.0 <= q <= 1.0
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def stats_ms(latencies_s: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds."""
    s = sorted(latencies_s)
    return percentile(s, 0.5) * 1e3, percentile(s, 0.99) * 1e3, (s[-1] * 1e3 if s else 0.0)


def quantiles_ms(latencies_s: Sequence[float], quantiles: Sequence[float] = CDF_QUANTILES) -> tuple[float, ...]:
    """The latency in milliseconds (rounded to the microsecond) at each of `quantiles`, by nearest
    rank; empty when there are no latencies (a CDF of nothing is not a line at zero)."""
    s = sorted(latencies_s)
    if not s:
        return ()
    return tuple(round(percentile(s, q) * 1e3, 3) for q in quantiles)


def value_for(seed: int) -> bytes:
    """The 100-byte value every put writes (printable, so a wrong read is easy to see)."""
    return (b"v%08d-" % (seed % 100_000_000)).ljust(VALUE_BYTES, b"x")


def _client_rng(seed: int, client: int, salt: int) -> random.Random:
    return random.Random(seed * 1_000_003 + client * 7_919 + salt)


def run(
    name: str,
    op_for_client: Callable[[int], Callable[[int], object]],
    *,
    clients: int,
    seconds: float,
    seed: int,
    ops_max: int = OPS_MAX_DEFAULT,
    warmup_s: float = WARMUP_S_DEFAULT,
    records_per_op: int = 1,
    events: Sequence[tuple[float, str, Callable[[], object]]] = (),
    keep_samples: bool = False,
) -> Result:
    """Run `op_for_client(c)(i)` for i = 0, 1, ... from `clients` threads at once (see the
    module docstring). `ops_max` bounds the operations of all clients together."""
    assert 1 <= clients <= CLIENTS_MAX, clients
    assert 0 < seconds <= SECONDS_MAX, seconds
    assert 0 <= warmup_s < seconds, (warmup_s, seconds)
    assert ops_max >= clients and records_per_op >= 1
    ops = [op_for_client(c) for c in range(clients)]  # built before the clock starts
    per_client_max = -(-ops_max // clients)
    samples: list[list[tuple[float, float, bool]]] = [[] for _ in range(clients)]
    kinds: list[dict[str, int]] = [{} for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    t0_box = [0.0]

    def client(c: int) -> None:
        op, mine, my_kinds = ops[c], samples[c], kinds[c]
        errors = 0
        ready.wait()
        t0 = t0_box[0]
        deadline = t0 + seconds
        i = 0
        while i < per_client_max and errors < ERRORS_MAX_PER_CLIENT:
            start = time.perf_counter()
            if start >= deadline:
                break
            ok = True
            try:
                op(i)
            except Exception as e:  # recorded, never fatal: the failure is part of the measurement
                ok = False
                errors += 1
                k = type(e).__name__
                my_kinds[k] = my_kinds.get(k, 0) + 1
            mine.append((start - t0, time.perf_counter() - start, ok))
            i += 1

    threads = [threading.Thread(target=client, args=(c,), name=f"bench-client-{c}", daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    event_log: list[dict] = []
    t0_box[0] = time.perf_counter()
    ready.wait()
    t0 = t0_box[0]
    event_thread = None
    if events:
        def fire() -> None:
            for at_s, ev_name, fn in sorted(events, key=lambda e: e[0]):
                delay = t0 + at_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                began = time.perf_counter() - t0
                entry = {"name": ev_name, "at_s": round(began, 4)}
                try:
                    entry["result"] = repr(fn())
                except Exception as e:
                    entry["error"] = f"{type(e).__name__}: {e}"
                entry["done_s"] = round(time.perf_counter() - t0, 4)
                event_log.append(entry)

        event_thread = threading.Thread(target=fire, name="bench-events", daemon=True)
        event_thread.start()
    for th in threads:
        th.join(max(0.0, t0 + seconds + JOIN_GRACE_S - time.perf_counter()))
    stuck = sum(th.is_alive() for th in threads)
    if event_thread is not None:
        event_thread.join(JOIN_GRACE_S)
    end_s = min(seconds, time.perf_counter() - t0)
    flat = sorted(
        (Sample(s, lat, ok) for per in samples[:] for (s, lat, ok) in list(per)), key=lambda x: x.start_s
    )
    counted = [x for x in flat if x.start_s >= warmup_s]
    window_s = max(1e-9, end_s - warmup_s)
    done_in_window = sum(1 for x in counted if x.ok and x.start_s + x.latency_s <= end_s)
    ok_latencies_s = [x.latency_s for x in counted if x.ok]
    p50, p99, mx = stats_ms(ok_latencies_s)
    error_kinds: dict[str, int] = {}
    for k in kinds:
        for kind, n in k.items():
            error_kinds[kind] = error_kinds.get(kind, 0) + n
    return Result(
        name=name, clients=clients, seed=seed, window_s=window_s, ops=len(counted),
        errors=sum(1 for x in flat if not x.ok), error_kinds=error_kinds,
        ops_s=done_in_window * records_per_op / window_s, p50_ms=p50, p99_ms=p99, max_ms=mx,
        records_per_op=records_per_op, samples=flat if keep_samples else [], events=event_log, clients_stuck=stuck,
        latency_quantiles_ms=quantiles_ms(ok_latencies_s),
    )


def put_key(prefix: str, tag: int, client: int, i: int) -> bytes:
    return b"%s/%06x/%03d/%09d" % (prefix.encode(), tag, client, i)


def run_puts(
    factory: ClientFactory,
    *,
    name: str,
    clients: int,
    seconds: float,
    seed: int,
    prefix: str,
    ops_max: int = OPS_MAX_DEFAULT,
    warmup_s: float = WARMUP_S_DEFAULT,
    events: Sequence[tuple[float, str, Callable[[], object]]] = (),
    keep_samples: bool = False,
) -> Result:
    """Closed-loop puts of unique keys with 100-byte values from `clients` threads."""
    value = value_for(seed)

    def op_for(c: int) -> Callable[[int], object]:
        put = factory(c).put
        tag = _client_rng(seed, c, 1).randrange(1 << 24)
        return lambda i: put(put_key(prefix, tag, c, i), value)

    return run(name, op_for, clients=clients, seconds=seconds, seed=seed, ops_max=ops_max, warmup_s=warmup_s,
               events=events, keep_samples=keep_samples)


def preload_keys(prefix: str, count: int, seed: int) -> list[bytes]:
    """`count` distinct keys for the get workload, in a seeded order."""
    assert 1 <= count <= OPS_MAX_DEFAULT
    keys = [b"%s/%09d" % (prefix.encode(), i) for i in range(count)]
    random.Random(seed).shuffle(keys)
    return keys


def preload(factory: ClientFactory, keys: Sequence[bytes], *, seed: int, clients: int = 16,
            seconds_max: float = PRELOAD_SECONDS_MAX) -> float:
    """Put every key once (value `value_for(seed)`), from `clients` threads; returns the seconds
    it took. Raises RuntimeError if a put fails or the time bound is reached first."""
    clients = max(1, min(clients, len(keys)))
    value = value_for(seed)
    share = [keys[c::clients] for c in range(clients)]
    failures: list[BaseException] = []
    deadline = time.perf_counter() + seconds_max

    def loader(c: int) -> None:
        put = factory(c).put
        for k in share[c]:
            if failures or time.perf_counter() > deadline:
                return
            try:
                put(k, value)
            except Exception as e:
                failures.append(e)
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loader, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.0, deadline + JOIN_GRACE_S - time.perf_counter()))
    took = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"preload failed: {type(failures[0]).__name__}: {failures[0]}")
    if took > seconds_max:
        raise RuntimeError(f"preload of {len(keys)} keys did not finish in {seconds_max:g} s")
    return took


class WrongValue(Exception):
    """A get returned something other than what the preload wrote."""


def run_gets(
    factory: ClientFactory,
    keys: Sequence[bytes],
    *,
    name: str,
    clients: int,
    seconds: float,
    seed: int,
    ops_max: int = OPS_MAX_DEFAULT,
    warmup_s: float = WARMUP_S_DEFAULT,
) -> Result:
    """Closed-loop gets of keys chosen at random (seeded, per client) from a pre-loaded set; a
    get that does not return the preloaded value counts as a failure (`WrongValue`)."""
    assert keys
    value = value_for(seed)

    def op_for(c: int) -> Callable[[int], object]:
        get = factory(c).get
        rng = _client_rng(seed, c, 2)
        n = len(keys)

        def op(_i: int) -> None:
            got = get(keys[rng.randrange(n)])
            if got != value:
                raise WrongValue(f"got {got[:16] if got else got!r}")

        return op

    return run(name, op_for, clients=clients, seconds=seconds, seed=seed, ops_max=ops_max, warmup_s=warmup_s)


def format_table(rows: Sequence[dict], *, unit: str = "ops/s") -> str:
    """A plain table of `Result.row()`s."""
    out = [f"{'measurement':44} {unit:>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}"]
    for r in rows:
        out.append(
            f"{r['name']:44} {r['ops_s']:>10,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.1f} {r['errors']:>6}"
        )
    return "\n".join(out)


__all__ = [
    "CDF_QUANTILES", "Client", "ClientFactory", "Result", "Sample", "WrongValue", "format_table", "percentile",
    "preload", "preload_keys", "put_key", "quantiles_ms", "run", "run_gets", "run_puts", "stats_ms", "value_for",
]
