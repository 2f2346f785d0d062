"""What one gRPC message costs in Python, by API and by pace: the measurements behind the
writer's sender loop (engine/head/senders.py) and behind a single client's put.

    python bench/grpc_costs.py [--messages 2000] [--json out.json]

Side by side in one run, over loopback, 300-byte messages on long-lived bidirectional streams
(the shape of the writer's AppendStream), servers in processes of their own:

* echo: the server's CPU per message, for a sync server (grpc.server, the nodes' kind) and an
  asyncio one (grpc.aio), with messages back to back and paced one every 1, 3 and 10 ms. A
  single client's put reaches each node about every 3 ms; a message that arrives alone costs
  the server far more than one of a busy stream, whichever API serves it;
* fan-out: one message to six echo servers and all six replies, the client's CPU per fan-out,
  with six threads on sync streams (the writer's senders before the sender loop), six threads
  handing each exchange to one shared aio loop, and six coroutines of that loop (the sender loop).

CPU is read from /proc (Linux), in clock ticks (10 ms at 100 Hz): a paced row of 1,000 messages
at ~200 us each is good to about 5%. Speed is reported, never asserted; every loop is bounded by its
message count. No engine code runs here: this is gRPC's own cost on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import sys
import threading
import time

import grpc

MESSAGE = b"m" * 300
PACES_S = (0.0, 0.001, 0.003, 0.01)
FANOUT = 6
_TICK = os.sysconf("SC_CLK_TCK")


def _identity(b: bytes) -> bytes:
    return b


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# --- servers (each in a process of its own) ---------------------------------------------------
def _echo_sync(requests, _context):
    for m in requests:
        yield m


async def _echo_aio(requests, _context):
    async for m in requests:
        yield m


def _handler(fn):
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(fn, _identity, _identity)})


def serve(kind: str, port: int, ready) -> None:
    address = f"127.0.0.1:{port}"
    if kind == "sync":
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(8))
        server.add_generic_rpc_handlers((_handler(_echo_sync),))
        server.add_insecure_port(address)
        server.start()
        ready.set()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(_echo_aio),))
        server.add_insecure_port(address)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


class Servers:
    """`count` echo servers of `kind`, each in its own process."""

    def __init__(self, kind: str, count: int, base_port: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ports = list(range(base_port, base_port + count))
        self.procs = []
        for port in self.ports:
            ready = ctx.Event()
            p = ctx.Process(target=serve, args=(kind, port, ready), daemon=True)
            p.start()
            if not ready.wait(30):
                raise RuntimeError(f"echo server on port {port} did not start")
            self.procs.append(p)

    def cpu_s(self) -> float:
        return sum(_cpu_s(p.pid) for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(10)


def _sync_stream(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    requests: queue.SimpleQueue = queue.SimpleQueue()
    replies = channel.stream_stream("/bench.Echo/Stream", _identity, _identity)(iter(requests.get, None))

    def exchange() -> bytes:
        requests.put(MESSAGE)
        return next(replies)

    def close() -> None:
        requests.put(None)
        channel.close()

    return exchange, close


# --- echo: the server's CPU per message, by pace ---------------------------------------------
def echo(kind: str, messages: int, base_port: int) -> list[dict]:
    servers = Servers(kind, 1, base_port)
    exchange, close = _sync_stream(servers.ports[0])
    rows = []
    try:
        for _ in range(100):
            exchange()
        for pace in PACES_S:
            n = messages if pace == 0 else max(50, messages // 2)
            before = servers.cpu_s()
            for _ in range(n):
                exchange()
                if pace:
                    time.sleep(pace)
            rows.append({"name": f"echo, {kind} server, one message every {pace * 1e3:g} ms" if pace
                         else f"echo, {kind} server, back to back",
                         "server_cpu_us": (servers.cpu_s() - before) / n * 1e6, "messages": n})
    finally:
        close()
        servers.close()
    return rows


# --- fan-out: the client's CPU per message to six servers -------------------------------------
def _fanout_threads(ports: list[int], rounds: int, via_loop: bool) -> float:
    loop = None
    if via_loop:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def open_call(port):
            return grpc.aio.insecure_channel(f"127.0.0.1:{port}").stream_stream("/bench.Echo/Stream", _identity, _identity)()

        calls = [asyncio.run_coroutine_threadsafe(open_call(p), loop).result(30) for p in ports]

        async def aio_exchange(call):
            await call.write(MESSAGE)
            return await call.read()

        exchanges = [lambda c=c: asyncio.run_coroutine_threadsafe(aio_exchange(c), loop).result(30) for c in calls]
        closes = []
    else:
        pairs = [_sync_stream(p) for p in ports]
        exchanges = [e for e, _c in pairs]
        closes = [c for _e, c in pairs]
    cond = threading.Condition()
    state = {"round": 0, "done": 0, "stop": False}

    def sender(exchange) -> None:
        seen = 0
        while True:
            with cond:
                while state["round"] == seen and not state["stop"]:
                    cond.wait()
                if state["stop"]:
                    return
                seen = state["round"]
            exchange()
            with cond:
                state["done"] += 1
                cond.notify_all()

    threads = [threading.Thread(target=sender, args=(e,), daemon=True) for e in exchanges]
    for t in threads:
        t.start()

    def one_round() -> None:
        with cond:
            state["done"] = 0
            state["round"] += 1
            cond.notify_all()
            while state["done"] < len(exchanges):
                cond.wait()

    try:
        for _ in range(50):
            one_round()
        before = time.process_time()
        for _ in range(rounds):
            one_round()
        return (time.process_time() - before) / rounds
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for t in threads:
            t.join(10)
        for c in closes:
            c()
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)


def _fanout_coroutines(ports: list[int], rounds: int) -> float:
    async def main() -> float:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        calls = [ch.stream_stream("/bench.Echo/Stream", _identity, _identity)() for ch in channels]

        async def exchange(call):
            await call.write(MESSAGE)
            return await call.read()

        for _ in range(50):
            await asyncio.gather(*(exchange(c) for c in calls))
        before = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*(exchange(c) for c in calls))
        cpu = (time.process_time() - before) / rounds
        for c in calls:
            c.cancel()
        for ch in channels:
            await ch.close()
        return cpu

    return asyncio.run(main())


def fanout(rounds: int, base_port: int) -> list[dict]:
    servers = Servers("sync", FANOUT, base_port)
    try:
        return [
            {"name": "fan-out to 6, six threads on sync streams", "client_cpu_us": _fanout_threads(servers.ports, rounds, False) * 1e6},
            {"name": "fan-out to 6, six threads through one aio loop", "client_cpu_us": _fanout_threads(servers.ports, rounds, True) * 1e6},
            {"name": "fan-out to 6, six coroutines of one aio loop", "client_cpu_us": _fanout_coroutines(servers.ports, rounds) * 1e6},
        ]
    finally:
        servers.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages per back-to-back echo (paced ones: half as many), and fan-out rounds")
    ap.add_argument("--base-port", type=int, default=27100, help="the echo servers listen on this port and the next ones (loopback)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    a = ap.parse_args(argv)
    if not 10 <= a.messages <= 1_000_000:
        ap.error("--messages must be between 10 and 1,000,000")
    if not 1024 <= a.base_port <= 65535 - 2 - FANOUT:
        ap.error(f"--base-port must be between 1024 and {65535 - 2 - FANOUT} (it and the next {1 + FANOUT} ports are used)")
    if not sys.platform.startswith("linux"):
        ap.error("CPU is read from /proc: Linux only")
    print(f"gRPC {grpc.__version__}, {a.messages} messages per measurement, {len(MESSAGE)}-byte messages, loopback", flush=True)
    rows = []
    for kind, port in (("sync", a.base_port), ("aio", a.base_port + 1)):
        for row in echo(kind, a.messages, port):
            print(f"{row['name']:<58} server CPU {row['server_cpu_us']:6.0f} us per message", flush=True)
            rows.append(row)
    for row in fanout(a.messages, a.base_port + 2):
        print(f"{row['name']:<58} client CPU {row['client_cpu_us']:6.0f} us per fan-out", flush=True)
        rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"grpc": grpc.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
