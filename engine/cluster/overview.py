"""The one status view: every process of a cluster in one table and one JSON shape.

Theory of operation
-------------------
Three commands used to show three tables of the same cluster: `sixfold status` (the writer
endpoint's view of the nodes), `cluster status` (the launcher's: every process and its health)
and `node rebuild-status` (each node's repair progress). Each now prints `table(processes)`
over the same rows and adds `"processes"` to its JSON, and the rest of its output (the writer's
line, security, backups...) stays as it was. A row is one process, node, writer or reader:

    id, role, az, address, metrics, pid, health, epoch,
    role         node, writer or reader; a deployment spec's reader that took over is the
                 writer, and the spec's writer entry a candidate (nothing records a spec's
                 promotion: engine.cluster.locate)
    lag          LSNs behind: a node's behind the writer's PGCLs (summed over PGs), a
                 reader's behind the writer's VDL; the writer 0
    lag_ms       a reader's lag in milliseconds (null for the others)
    used_bytes, capacity_bytes, max_storage_bytes     a node's storage (null for the others)
    repair       a node's rebuild progress: fraction, fetched_records, repaired, corrupt_found,
                 complete (null for the others)
    faults       what is in force against it: real network cuts (the processes it cannot reach
                 or hear, `engine.cluster.netfaults`) and its state when not running (paused)
    pgs          with `detail`: per protection group, a node's scl, the writer's pgcl and lag

`from_launcher(status)` builds the rows from `StatusView.status()` (every process, asked
directly: it works with the writer down, and for a deployment spec from any machine that reaches
the processes); `from_writer(status, target)` from the writer endpoint's KV `Status` (`sixfold
status --target HOST:PORT`: the nodes as the writer sees them; readers it does not know).

Rules of this module: values in, values out (the callers ask the processes), but for
`network_cuts`, which reads the nft tables of a namespaced cluster.
"""

from __future__ import annotations

from engine.cluster.manifest import WRITER

HEADERS = ("process", "az", "address", "metrics", "role", "health", "epoch", "lag", "lag(ms)", "repair", "faults",
           "used", "capacity", "use%", "maximum")


def _repair(n: dict) -> dict | None:
    rb = n.get("rebuild")
    if rb is None and "repaired" not in n:
        return None
    rb = rb or {}
    return {"fraction": rb.get("fraction"), "fetched_records": rb.get("fetched_records"), "repaired": n.get("repaired"),
            "corrupt_found": n.get("corrupt_found"), "complete": rb.get("complete")}


def _pgs(scls, pgcls) -> list[dict]:
    if not scls:
        return []
    pgcls = list(pgcls or [None] * len(scls))
    return [{"pg": pg, "scl": int(s), "pgcl": None if p is None else int(p),
             "lag": None if p is None else max(0, int(p) - int(s))} for pg, (s, p) in enumerate(zip(scls, pgcls))]


def _faults(name: str, health: str, cuts: dict | None) -> list[str]:
    """What is in force against process `name`. `cuts[name]` is a list (processes cut off both
    ways) or {"reach": [...], "hear": [...]} (what its packets to them, and theirs to it, lose):
    a peer in both is "cut from", in one only a one-way drop ("cannot reach", "cannot hear")."""
    out = []
    if health == "PAUSED":
        out.append("paused (SIGSTOP)")
    blocked = (cuts or {}).get(name)
    if isinstance(blocked, dict):
        reach, hear = set(blocked.get("reach") or ()), set(blocked.get("hear") or ())
        for text, peers in (("cut from", reach & hear), ("cannot reach", reach - hear), ("cannot hear", hear - reach)):
            if peers:
                out.append(f"{text} " + ", ".join(sorted(peers)))
    elif blocked:
        out.append("cut from " + ", ".join(blocked))
    return out


def from_launcher(st: dict, *, detail: bool = False, cuts: dict | None = None) -> list[dict]:
    """Rows from the launcher's status (`engine.cluster.status.StatusView.status`). `cuts`: the
    real network faults in force (`network_cuts`: per process, whom it cannot reach or hear)."""
    w = st["writer"]
    rows = []
    for n in st["nodes"]:
        row = {"id": n["id"], "role": "node", "az": n["az"], "address": n["address"], "metrics": n.get("metrics"),
               "pid": n.get("pid"), "health": n["health"], "epoch": n.get("epoch"), "lag": n.get("lag"), "lag_ms": None,
               "used_bytes": n.get("used_bytes"), "capacity_bytes": n.get("capacity_bytes"),
               "max_storage_bytes": n.get("max_storage_bytes"), "repair": _repair(n),
               "faults": _faults(n["id"], n["health"], cuts)}
        if detail:
            row["pgs"] = _pgs(n.get("scls"), w.get("pgcl"))
        rows.append(row)
    # A reader of a deployment spec that took over serves as the writer (nothing recorded it):
    # it is the writer's row, and the spec's writer entry a candidate (down, or a standby).
    promoted = any(r.get("serves_as_writer") for r in st.get("readers", ()))
    rows.append({"id": WRITER, "role": "candidate" if promoted else "writer", "az": w.get("az", "a"),
                 "address": w["address"], "metrics": w.get("metrics"),
                 "pid": w.get("pid"), "health": w["health"], "epoch": w.get("epoch"), "lag": 0 if "vdl" in w else None,
                 "lag_ms": None, "used_bytes": None, "capacity_bytes": None, "max_storage_bytes": None, "repair": None,
                 "faults": _faults(WRITER, w["health"], cuts)})
    for r in st.get("readers", ()):
        writer = bool(r.get("serves_as_writer"))
        rows.append({"id": r["id"], "role": "writer" if writer else "reader", "az": r["az"], "address": r["address"],
                     "metrics": r.get("metrics"), "pid": r.get("pid"), "health": r["health"], "epoch": r.get("epoch"),
                     "lag": 0 if writer else r.get("lag_lsns"),
                     "lag_ms": r.get("lag_ms"), "used_bytes": None, "capacity_bytes": None, "max_storage_bytes": None,
                     "repair": None, "faults": _faults(r["id"], r["health"], cuts)})
    return rows


def from_writer(st: dict, target: str, *, detail: bool = False) -> list[dict]:
    """Rows from the writer endpoint's KV `Status` (`db.status()`): its nodes as it sees them
    (health SERVING when it reaches one, UNREACHABLE when not) and itself at `target`."""
    rows = []
    for n in st["nodes"]:
        scl = n.get("scl") or {}
        lag = n.get("lag") or {}
        row = {"id": n["id"], "role": "node", "az": n["az"], "address": n.get("address"), "metrics": None, "pid": None,
               "health": "SERVING" if n.get("up") else "UNREACHABLE", "epoch": n.get("epoch"),
               "lag": sum(int(v) for v in lag.values()) if lag else None, "lag_ms": None,
               "used_bytes": n.get("used_bytes"), "capacity_bytes": n.get("capacity_bytes"),
               "max_storage_bytes": n.get("max_storage_bytes"),
               "repair": {"fraction": None, "fetched_records": None, "repaired": n.get("repaired"),
                          "corrupt_found": n.get("corrupt_found"), "complete": (sum(int(v) for v in lag.values()) == 0)
                          if lag else None},
               "faults": []}
        if detail:
            pgs = sorted(scl, key=int)
            row["pgs"] = [{"pg": int(pg), "scl": int(scl[pg]), "pgcl": int(scl[pg]) + int(lag.get(pg, 0)),
                           "lag": int(lag.get(pg, 0))} for pg in pgs]
        rows.append(row)
    rows.append({"id": WRITER, "role": "writer", "az": None, "address": target, "metrics": None, "pid": None,
                 "health": "SERVING", "epoch": st.get("epoch"), "lag": 0, "lag_ms": None, "used_bytes": None,
                 "capacity_bytes": None, "max_storage_bytes": None, "repair": None, "faults": []})
    return rows


def _repair_cell(r: dict | None) -> str | None:
    if not r:
        return None
    if r.get("fraction") is not None:
        text = "done" if r.get("complete") else f"{r['fraction']:.0%}"
    else:
        text = "done" if r.get("complete") else "-"
    if r.get("repaired"):
        text += f" ({r['repaired']} repaired)"
    if r.get("corrupt_found"):
        text += f" {r['corrupt_found']} corrupt"
    return text


def _storage_cells(r: dict) -> list:
    """used, capacity (its maximum, or less when the disk or a file size limit is smaller), the
    share used and the maximum; last in the table, so a script can cut them off the end."""
    from engine.sizes import format_size, used_percent

    used, capacity, maximum = r.get("used_bytes"), r.get("capacity_bytes"), r.get("max_storage_bytes")
    if used is None or not capacity:
        return [None, None, None, None if maximum is None else format_size(maximum)]
    return [format_size(used), format_size(capacity), f"{used_percent(used, capacity):.0f}%",
            None if maximum is None else format_size(maximum)]


def table(rows: list[dict], *, detail: bool = False) -> str:
    """The one table (HEADERS), and with `detail` a per-PG table of the nodes after it."""
    from engine.output import table as render

    cells = []
    for r in rows:
        cells.append([r["id"], r.get("az"), r.get("address"), r.get("metrics"), r["role"], r["health"], r.get("epoch"),
                      r.get("lag"), None if r.get("lag_ms") is None else f"{r['lag_ms']:.1f}",
                      _repair_cell(r.get("repair")), "; ".join(r.get("faults") or ()) or None, *_storage_cells(r)])
    out = render(cells, list(HEADERS))
    if detail:
        pg_rows = [[r["id"], p["pg"], p["scl"], p["pgcl"], p["lag"]] for r in rows for p in r.get("pgs") or ()]
        if pg_rows:
            out += "\n" + render(pg_rows, ["node", "pg", "scl", "pgcl", "lag"])
    return out


def network_cuts(folder: str) -> dict[str, dict[str, list[str]]]:
    """{process: {"reach": [processes its packets to are dropped], "hear": [processes whose
    packets to it are dropped]}} from the nft tables of a `--netns` cluster's namespaces (the
    output and input chains of `engine.cluster.netfaults.ruleset`); empty for any other
    cluster, or when nft cannot be asked."""
    from engine.cluster.netns import NetnsError, load_record

    try:
        plan = load_record(folder)
    except NetnsError:
        return {}
    if plan is None:
        return {}
    from engine.cluster.netfaults import NetFaults

    try:
        nf = NetFaults(folder)
    except NetnsError:
        return {}
    out: dict[str, dict[str, list[str]]] = {}
    for name in nf.names:
        found = chain_drops(nf.table(name), {v[2]: peer for peer, v in plan.processes.items()})
        if found["reach"] or found["hear"]:
            out[name] = found
    return out


def chain_drops(text: str, by_address: dict[str, str]) -> dict[str, list[str]]:
    """The processes an nft fault table (as `nft list table` prints it) drops: "hear" from its
    input chain (by source address), "reach" from its output chain (by destination)."""
    import re

    def named(part: str) -> list[str]:
        return sorted({by_address[a] for a in by_address if re.search(rf"(?<![\d.]){re.escape(a)}(?!\d)", part)})

    head, _, output = text.partition("chain output")
    _, _, input_ = head.partition("chain input")
    return {"reach": named(output), "hear": named(input_)}


__all__ = ["HEADERS", "chain_drops", "from_launcher", "from_writer", "network_cuts", "table"]
