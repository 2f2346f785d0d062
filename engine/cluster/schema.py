"""The shape of a cluster manifest (`DIR/cluster.json`), checked every time one is loaded.

Theory of operation
-------------------
The manifest is a JSON file that people, scripts and several `sixfold` processes read and write.
Valid JSON of the wrong shape (a field missing, a string where a number belongs, a node list that
is an object, a port of 70000) used to surface far from its cause, as a `KeyError` or an
`AttributeError` deep in the launcher, the client or a node process. `validate_manifest` checks
the whole document once, right after it is parsed (`manifest.load_manifest` calls it), and raises
`WrongFolder` with one line that names the file, the field (`nodes[2].address`), what was
expected and what was found. Code after the load may then index the manifest freely.

What is checked (formats 1 and 2; the checks are hand-written, standard library only):

    format              optional int (the version check itself is the loader's); 2 exactly when
                        the volume is encrypted and nothing is placed; 3 when something is placed
                        (data_root, tls_dir or a process's listen), encrypted or not
    encryption          required in format 2, optional in 3, absent in 0 and 1: the envelope
                        descriptor (`engine.envelope.descriptor_problems`: scheme, wrapped data key)
    data_root           format 3, optional: an absolute folder, each node host's, under which the
                        nodes' relative data paths lie
    tls_dir             format 3, optional: a non-empty path (absolute, or relative to the
                        manifest's folder) of the TLS material
    key_file            optional non-empty absolute path (the master key's file, outside the
                        folder ideally; the only path that is not relative to it)
    volume_id           non-empty string
    protection_groups   int in 1..PROTECTION_GROUPS_MAX
    durable             bool
    base_port           int in 1..65535
    host                optional non-empty string
    write_timeout_s     optional finite number > 0
    gossip_interval_s   optional finite number >= 0
    tls                 optional bool (absent: an insecure cluster, as before the field existed)
    allow_fault_injection   optional bool (absent: false)
    max_storage_bytes   optional int in engine.sizes' STORAGE_BYTES_MIN..STORAGE_BYTES_MAX (absent:
                        the nodes' default)
    metrics_port_offset optional null or int in 1..65534 (absent: the default, 1000; null: no
                        metrics); every process's port plus it must be a port (<= 65535) and no
                        process's port
    nodes               non-empty list of node objects, ids and addresses unique:
        id              node id (1..64 ASCII letters, digits, - or _)
        az              1..64 ASCII letters, digits, - or _ (it names a folder)
        address         "host:port", port in 1..65535
        listen          format 3, optional: "host:port" it binds, when not its address
        pid             null or int in 1..PID_MAX
        data, log       non-empty relative paths (relative to the cluster folder)
        retired         optional bool
        promoted        optional bool: it took over as the writer (retired, its port the writer's)
        replaces, replaced_by   optional null or node id
    writer              object: address, pid, log as for a node; optional epoch (the epoch it
                        opened at, written by the writer process itself); optional az (a standby that
                        took over records its own)
    users_file          optional null or non-empty relative path (absent: "users.json", auth on;
                        null: auth off; see manifest.py)
    backup              optional object (absent: no backups; engine.backup): target, an absolute
                        folder path; retention_days, null or a number > 0
    readers             optional list of reader instances (absent: none), ids unique and none a
                        node's id, ports unique among every process:
        id, az          as for a node
        address, pid, log   as for a node
        retired         optional bool

Fields not listed are allowed, so that a newer release can add one without breaking an older
reader; booleans are never accepted as numbers (JSON `true` is not a port). A manifest whose
integer `format` is above the newest format the caller reads is not shape-checked here: its
version is the news, and the loader reports it.

Rules of this module: standard library, `engine.errors`, `engine.sizes`, `engine.core.constants` and
`engine.envelope.descriptor_problems` (the one shape check of an encryption descriptor, shared
with the embedded volume.json) only; it knows nothing of processes.
"""

from __future__ import annotations

import math
import re
from typing import Any

from engine.core.constants import PROTECTION_GROUPS_MAX
from engine.envelope import descriptor_problems
from engine.errors import WrongFolder
from engine.sizes import STORAGE_BYTES_MAX, STORAGE_BYTES_MIN

PORT_MIN, PORT_MAX = 1, 65535
#: The largest pid Linux hands out (`/proc/sys/kernel/pid_max` can be raised to 2**22).
PID_MAX = 1 << 22
#: Node ids and AZ names: the rule of `engine.transport.convert.check_node_id` (ids appear on
#: command lines and in folder names, so they are kept to a safe alphabet).
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The format of an encrypted cluster's manifest (`engine.cluster.manifest.ENCRYPTED_MANIFEST_FORMAT`;
#: not imported: the manifest module imports this one).
ENCRYPTED_FORMAT = 2
#: The format of a placed manifest (`engine.cluster.manifest.PLACED_MANIFEST_FORMAT`).
PLACED_FORMAT = 3
#: How much of a wrong value the message quotes (it stays one line).
QUOTE_MAX = 60


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= QUOTE_MAX else text[: QUOTE_MAX - 3] + "..."


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Checker:
    """Walks one manifest; the first wrong field raises WrongFolder."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, expected: str, value: Any, *, missing: bool = False) -> None:
        found = "it is missing" if missing else f"got {_kind(value)} {_quote(value)}"
        raise WrongFolder(
            f"{self.where} is not a valid cluster manifest: field {field!r} must be {expected}, {found} "
            "(fix or restore the file; `sixfold cluster up` writes a new one in an empty folder)"
        )

    def get(self, obj: dict, key: str, field: str, expected: str, *, optional: bool = False) -> tuple[bool, Any]:
        if key not in obj:
            if not optional:
                self.fail(field, expected, None, missing=True)
            return False, None
        return True, obj[key]

    def object(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def integer(self, obj: dict, key: str, field: str, low: int, high: int, *, optional: bool = False,
                nullable: bool = False) -> None:
        expected = f"an integer in {low}..{high}" + (" or null" if nullable else "")
        present, value = self.get(obj, key, field, expected, optional=optional)
        if not present or (nullable and value is None):
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(field, expected, value)

    def number(self, obj: dict, key: str, field: str, *, positive: bool, optional: bool = False) -> None:
        expected = "a finite number " + ("> 0" if positive else ">= 0")
        present, value = self.get(obj, key, field, expected, optional=optional)
        if not present:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0):
            self.fail(field, expected, value)

    def boolean(self, obj: dict, key: str, field: str, *, optional: bool = False) -> None:
        present, value = self.get(obj, key, field, "true or false", optional=optional)
        if present and not isinstance(value, bool):
            self.fail(field, "true or false", value)

    def string(self, obj: dict, key: str, field: str, *, optional: bool = False, nullable: bool = False) -> None:
        expected = "a non-empty string" + (" or null" if nullable else "")
        present, value = self.get(obj, key, field, expected, optional=optional)
        if not present or (nullable and value is None):
            return
        if not isinstance(value, str) or not value or "\x00" in value:
            self.fail(field, expected, value)

    def name(self, obj: dict, key: str, field: str, what: str, *, optional: bool = False, nullable: bool = False) -> None:
        expected = f"{what} (1..64 ASCII letters, digits, - or _)" + (" or null" if nullable else "")
        present, value = self.get(obj, key, field, expected, optional=optional)
        if not present or (nullable and value is None):
            return
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            self.fail(field, expected, value)

    def path(self, obj: dict, key: str, field: str) -> None:
        expected = "a non-empty path relative to the cluster folder"
        _, value = self.get(obj, key, field, expected)
        if not isinstance(value, str) or not value or "\x00" in value or value.startswith("/"):
            self.fail(field, expected, value)

    def address(self, obj: dict, key: str, field: str) -> int:
        """Checks "host:port"; returns the port."""
        expected = f'a "host:port" string with a port in {PORT_MIN}..{PORT_MAX}'
        _, value = self.get(obj, key, field, expected)
        if isinstance(value, str) and value.isascii():
            host, sep, port = value.rpartition(":")
            if sep and host and not any(c.isspace() for c in host) and port.isdigit() and len(port) <= 5 \
                    and PORT_MIN <= int(port) <= PORT_MAX:
                return int(port)
        self.fail(field, expected, value)
        raise AssertionError("unreachable")  # fail() always raises

    def process(self, entry: dict, field: str, fmt: int = 0) -> int:
        """The fields every process entry has (writer and nodes); returns its port."""
        port = self.address(entry, "address", f"{field}.address")
        if entry.get("listen") is not None:
            if fmt != PLACED_FORMAT:
                self.fail(f"{field}.listen", f"absent from a format-{fmt} manifest: a process that binds another "
                          f"address than it is dialled at is format {PLACED_FORMAT}", entry["listen"])
            self.address(entry, "listen", f"{field}.listen")
        self.integer(entry, "pid", f"{field}.pid", 1, PID_MAX, nullable=True)
        self.path(entry, "log", f"{field}.log")
        return port


def validate_manifest(manifest: Any, where: str = "cluster.json", *, format_max: int | None = None) -> dict:
    """Check a parsed manifest against the schema above; returns it unchanged.

    `where` names the file in the message. With `format_max`, a manifest whose integer `format`
    is above it is returned unchecked (the caller's version check reports it). Raises
    WrongFolder naming the first wrong field."""
    c = _Checker(where)
    m = c.object(manifest, "(the whole file)")
    present, fmt = c.get(m, "format", "format", "an integer", optional=True)
    if present and (isinstance(fmt, bool) or not isinstance(fmt, int)):
        c.fail("format", "an integer", fmt)
    if present and format_max is not None and fmt > format_max:
        return m
    c.string(m, "volume_id", "volume_id")
    c.integer(m, "protection_groups", "protection_groups", 1, PROTECTION_GROUPS_MAX)
    c.boolean(m, "durable", "durable")
    c.integer(m, "base_port", "base_port", PORT_MIN, PORT_MAX)
    c.string(m, "host", "host", optional=True)
    c.number(m, "write_timeout_s", "write_timeout_s", positive=True, optional=True)
    c.number(m, "gossip_interval_s", "gossip_interval_s", positive=False, optional=True)
    c.boolean(m, "tls", "tls", optional=True)
    c.boolean(m, "allow_fault_injection", "allow_fault_injection", optional=True)
    c.integer(m, "max_storage_bytes", "max_storage_bytes", STORAGE_BYTES_MIN, STORAGE_BYTES_MAX, optional=True)
    c.integer(m, "metrics_port_offset", "metrics_port_offset", 1, PORT_MAX - 1, optional=True, nullable=True)
    fmt_value = fmt if present else 0
    for key in ("data_root", "tls_dir"):
        if m.get(key) is not None and fmt_value != PLACED_FORMAT:
            c.fail(key, f"absent from a format-{fmt_value} manifest: a placed manifest is format {PLACED_FORMAT}", m[key])
    if m.get("data_root") is not None:
        c.string(m, "data_root", "data_root")
        if not m["data_root"].startswith("/"):
            c.fail("data_root", "an absolute path", m["data_root"])
    if m.get("tls_dir") is not None:
        c.string(m, "tls_dir", "tls_dir")
    if present and fmt == PLACED_FORMAT:
        if "encryption" in m:
            problems = descriptor_problems(m["encryption"])
            if problems:
                c.fail("encryption", f"an encryption descriptor ({'; '.join(problems)})", m["encryption"])
    elif present and fmt == ENCRYPTED_FORMAT:
        if "encryption" not in m:
            c.fail("encryption", f"an encryption descriptor in a format-{ENCRYPTED_FORMAT} (encrypted) manifest", None,
                   missing=True)
        problems = descriptor_problems(m["encryption"])
        if problems:
            c.fail("encryption", f"an encryption descriptor ({'; '.join(problems)})", m["encryption"])
    elif "encryption" in m:
        c.fail("encryption", f"absent from a format-{fmt if present else 0} (plain) manifest: an encrypted "
               f"cluster's manifest is format {ENCRYPTED_FORMAT}", m["encryption"])
    c.string(m, "key_file", "key_file", optional=True)
    if isinstance(m.get("key_file"), str) and not m["key_file"].startswith("/"):
        c.fail("key_file", "an absolute path", m["key_file"])

    c.boolean(m, "promote_readers", "promote_readers", optional=True)
    present, backup = c.get(m, "backup", "backup", "an object", optional=True)
    if present:
        c.string(c.object(backup, "backup"), "target", "backup.target")
        if not backup["target"].startswith("/"):
            c.fail("backup.target", "an absolute path", backup["target"])
        if backup.get("retention_days") is not None:
            c.number(backup, "retention_days", "backup.retention_days", positive=True)
    if "failover_to" in m:  # a planned failover's reader (engine.cluster.commands)
        c.name(m, "failover_to", "failover_to", "a reader id")
    if m.get("users_file") is not None:  # absent or null are fine (see manifest.py)
        c.path(m, "users_file", "users_file")

    _, writer = c.get(m, "writer", "writer", "an object")
    ports = {c.process(c.object(writer, "writer"), "writer", fmt_value): "writer"}
    if "az" in writer:  # recorded by a standby that took over (engine.head.failover)
        c.name(writer, "az", "writer.az", "an AZ name")
    if "epoch" in writer:  # the epoch it opened at (a newer writer's record is never overwritten by an older)
        c.integer(writer, "epoch", "writer.epoch", 0, 2**62)

    _, nodes = c.get(m, "nodes", "nodes", "a non-empty list of node objects")
    if not isinstance(nodes, list) or not nodes:
        c.fail("nodes", "a non-empty list of node objects", nodes)
    ids: dict[str, str] = {}
    for i, raw in enumerate(nodes):
        field = f"nodes[{i}]"
        n = c.object(raw, field)
        c.name(n, "id", f"{field}.id", "a node id")
        if n["id"] in ids:
            c.fail(f"{field}.id", f"unique (it is the id of {ids[n['id']]} too)", n["id"])
        ids[n["id"]] = field
        c.name(n, "az", f"{field}.az", "an AZ name")
        port = c.process(n, field, fmt_value)
        if port in ports:
            c.fail(f"{field}.address", f"a port of its own (port {port} is {ports[port]}'s)", n["address"])
        ports[port] = field
        c.path(n, "data", f"{field}.data")
        c.boolean(n, "retired", f"{field}.retired", optional=True)
        c.name(n, "replaces", f"{field}.replaces", "a node id", optional=True, nullable=True)
        c.name(n, "replaced_by", f"{field}.replaced_by", "a node id", optional=True, nullable=True)

    present, readers = c.get(m, "readers", "readers", "a list of reader objects", optional=True)
    if present:
        if not isinstance(readers, list):
            c.fail("readers", "a list of reader objects", readers)
        for i, raw in enumerate(readers):
            field = f"readers[{i}]"
            r = c.object(raw, field)
            c.name(r, "id", f"{field}.id", "a reader id")
            if r["id"] in ids or r["id"] == "writer":
                c.fail(f"{field}.id", f"unique (it is the id of {ids.get(r['id'], 'the writer')} too)", r["id"])
            ids[r["id"]] = field
            c.name(r, "az", f"{field}.az", "an AZ name")
            port = c.process(r, field, fmt_value)
            c.boolean(r, "retired", f"{field}.retired", optional=True)
            c.boolean(r, "promoted", f"{field}.promoted", optional=True)
            # A reader that took over as the writer (engine.head.failover) left its port to it.
            handed_over = r.get("promoted") and r.get("retired") and ports.get(port) == "writer"
            if port in ports and not handed_over:
                c.fail(f"{field}.address", f"a port of its own (port {port} is {ports[port]}'s)", r["address"])
            ports.setdefault(port, field)
    offset = m.get("metrics_port_offset")
    if offset is not None:
        for port, field in sorted(ports.items()):
            if port + offset > PORT_MAX or port + offset in ports:
                what = f"past {PORT_MAX}" if port + offset > PORT_MAX else f"{ports[port + offset]}'s port"
                c.fail("metrics_port_offset", f"an offset that makes every process's metrics port (its port plus the "
                       f"offset) a port of its own, but {field}'s {port} + {offset} is {what}", offset)
    return m


__all__ = ["PID_MAX", "validate_manifest"]
