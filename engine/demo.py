"""A short tour of the embedded engine: `python -m engine.demo [PATH]` (what `make demo` runs).

It writes, loses an AZ (writes go on), loses one more node (writes are refused, reads still
work, nothing is lost), heals, and prints the volume's status as a table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import engine
from engine.node.service import wait_until


def say(step: str, text: str) -> None:
    print(f"\n== {step}: {text}")


def status_table(db) -> str:
    st = db.status()
    P = st["protection_groups"]
    rows = [("node", "az", "up", "epoch", "records", "scl min..max", "corrupt", "repaired")]
    for n in st["nodes"]:
        scl = n.get("scl")
        span = f"{min(scl.values())}..{max(scl.values())}" if scl else "-"
        rows.append(
            (n["id"], n["az"], "yes" if n["up"] else "DOWN", str(n.get("epoch", "-")), str(n.get("records", "-")), span,
             str(n.get("corrupt_found", "-")), str(n.get("repaired", "-")))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"VDL {st['vdl']}  epoch {st['epoch']}  protection groups {P}  codec {st['codec']}  durable {st['durable']}")
    return "\n".join(lines)


def run(path: str, keep: bool = True) -> None:
    print(f"Sixfold embedded demo: six storage nodes (n1..n6), two in each AZ a, b, c, under {path}")
    print(f"codec: {engine.codec_implementation()}")
    with engine.open(path, write_timeout_s=1.0, gossip_interval_s=0.05) as db:
        say("1", "write a few keys; each put returns once 4 of 6 segments hold it")
        db.put(b"user:1", b"alice")
        with db.batch() as b:  # atomic: one consistency point for both
            b.put(b"user:2", b"bob")
            b.put(b"user:3", b"carol")
        for k, v in db.scan(b"user:", b"user;"):
            print(f"   {k.decode()} = {v.decode()}")
        snap = db.snapshot()
        print(f"   snapshot taken at read point (VDL) {snap.read_point}")

        say("2", "AZ b goes down (n3, n4): four segments remain, so writes go on")
        db.cluster.stop_az("b")
        t0 = time.perf_counter()
        for i in range(100):
            db.put(b"order:%03d" % i, b"paid")
        print(f"   100 puts with AZ b down took {(time.perf_counter() - t0) * 1000:.0f} ms")

        say("3", "n1 goes down too (AZ + 1): three segments are not a write quorum")
        db.cluster.stop_node("n1")
        time.sleep(0.3)  # the writer notices on its next heartbeat
        try:
            db.put(b"user:4", b"dave")
            print("   unexpected: the write went through")
        except engine.Unavailable as e:
            print(f"   write refused ({type(e).__name__}): {e}")
        print(f"   ...but reads work: user:1 = {db.get(b'user:1')!r}, order:099 = {db.get(b'order:099', quorum=True)!r}")
        print(f"   and the snapshot still sees its point in time: order:000 = {snap.get(b'order:000')!r}")
        print(f"   keys readable: {sum(1 for _ in db.scan())} (all acknowledged writes)")

        say("4", "bring n1 and AZ b back: writes resume, the returning nodes catch up by gossip")
        db.cluster.start_node("n1")
        db.cluster.start_az("b")
        deadline = time.monotonic() + 10
        while True:
            try:
                db.put(b"user:4", b"dave")
                break
            except engine.Unavailable:
                if time.monotonic() > deadline:
                    raise
        wait_until(lambda: len({str(n.get("scl")) for n in db.status()["nodes"]}) == 1, 10)
        print(f"   user:4 = {db.get(b'user:4')!r}; {sum(1 for _ in db.scan())} keys in all")

        say("5", "status of the volume")
        print(status_table(db))
    if keep:
        print(f"\nDone. The data stays in {path}: reopen it with engine.open({path!r}).")
    else:
        print("\n(The demo uses a temporary folder, removed at the end; pass a path to keep the embedded data.)")


def failover(root: str) -> None:
    """A cluster of processes (six nodes, a writer, a reader) and an automatic failover."""
    import os
    import signal

    from engine.cluster.launcher import Cluster
    from engine.cluster.manifest import WRITER, load_manifest
    from engine.cluster.testing import free_base_port

    folder = os.path.join(root, "cluster")
    say("6", "a cluster of processes with a read replica: SIGKILL the writer, the replica takes over")
    c = Cluster(folder)
    c.up(base_port=free_base_port(9), durable=False, readers=1)
    try:
        with engine.connect(folder, timeout_s=10) as db:
            db.put(b"user:1", b"alice")
            w = load_manifest(folder)[WRITER]
            print(f"   writer at {w['address']} (pid {w['pid']}), reader r1 at "
                  f"{load_manifest(folder)['readers'][0]['address']}")
            t0 = time.monotonic()
            os.kill(w["pid"], signal.SIGKILL)
            print("   writer killed (SIGKILL); nobody acts")
            db.put(b"user:2", b"bob")  # the client follows the writer to the replica that took over
            w2 = load_manifest(folder)[WRITER]
            print(f"   {time.monotonic() - t0:.2f} s later a put succeeded through the new writer at {w2['address']} "
                  f"(epoch {db.status()['epoch']}); user:1 = {db.get(b'user:1')!r}, user:2 = {db.get(b'user:2')!r}")
    finally:
        c.down(timeout_s=10)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="A short tour of the Sixfold embedded engine, then a cluster failover.")
    ap.add_argument("path", nargs="?", help="data folder (default: a new temporary folder, removed afterwards)")
    ap.add_argument("--no-cluster", action="store_true", help="skip the cluster and failover part")
    args = ap.parse_args(argv)
    if args.path:
        run(args.path)
        return
    tmp = tempfile.mkdtemp(prefix="sixfold-demo-")
    try:
        run(tmp, keep=False)
        if not args.no_cluster:
            failover(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
