"""Hosts in network namespaces: `sixfold cluster up --netns` gives each process a host of its own.

Theory of operation
-------------------
On Linux, as root, each process of a cluster (six nodes, the writer endpoint, the readers) runs
in a network namespace of its own, so it has its own address, and a fault can cut its real
packets (`engine.cluster.faults`: nft rules inside the namespaces) instead of a gate in the gRPC
layer. The layout:

* addresses from the benchmarking range 198.18.0.0/15 (RFC 2544: never routed on the Internet,
  meant for tests like this one). A cluster takes a free *slot*: the /22 at 198.18.0.0 + 4 *
  slot * 256, checked against every IPv4 address of the machine under a machine-wide lock
  (`LOCK_FILE`), so parallel runs never share one; AZ a is the slot's second /24, b the third,
  c the fourth (one subnet per AZ);
* one Linux bridge in the machine's own namespace, with the gateway address .254 of each AZ
  subnet on it: the machine's namespace (`engine.connect`, the CLI, the benchmarks) reaches every
  process directly, with no forwarding and no sysctl changed;
* per process a namespace `sfx-<tag>-<name>` with loopback up and one veth pair whose outer end
  is enslaved to the bridge and whose inner end, `eth0`, holds the process's address (.10 and
  up in its AZ's subnet) and an on-link route to the whole slot: the processes of other AZs are
  one bridge hop away, as on one L2 segment.

`<tag>` is six hex digits chosen when the cluster is created; interface names stay within the
kernel's 15 characters (`sfb<tag>` the bridge, `sfv<tag><nn>` the outer veth ends).

Crash safety: `DIR/netns.json` records the whole plan (tag, slot, bridge, every namespace and
veth, every address) *before* anything is created, and `teardown` deletes everything the record
names whether or not it exists, so a launcher that died half-way leaves nothing that `sixfold
cluster down` does not remove. `teardown` removes the record last.

The processes are started in their namespace by `ip netns exec NS ...` (`exec_prefix`), which
execs the command, so the pid the supervisor records is the process's own.

Rules of this module: standard library, `engine.errors` and `engine.files` only; it runs `ip`
and knows nothing of the manifest beyond the names and AZs it is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.errors import SixfoldError

RECORD_FILE = "netns.json"
RECORD_FORMAT = 1
#: The benchmarking range (RFC 2544), owned by tests.
RANGE = ipaddress.ip_network("198.18.0.0/15")
#: /24s per slot: the slot's first is unused (reserved), then one per AZ.
SLOT_SUBNETS = 4
SLOTS = RANGE.num_addresses // 256 // SLOT_SUBNETS
AZ_ORDER = ("a", "b", "c")
GATEWAY_HOST = 254
FIRST_HOST = 10
#: Machine-wide: slot choice and bridge creation of concurrent launchers, one at a time.
LOCK_FILE = "/run/sixfold-netns.lock"
NS_PREFIX = "sfx-"
IP_TIMEOUT_S = 20.0
#: The most processes one cluster puts in namespaces (per AZ: .10 .. .253).
PROCESSES_MAX = 64


class NetnsError(SixfoldError):
    """Network namespaces could not be made or removed here (not Linux, not root, no `ip`, the
    kernel refused, no free slot). The message says which and what to do."""

    GRPC_STATUS = "FAILED_PRECONDITION"


def unavailable_reason() -> str | None:
    """Why this machine cannot run a namespaced cluster (None: it can). Checks by doing: makes
    and removes a namespace."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or leave out --netns)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{NS_PREFIX}probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as e:
        return f"this machine does not allow network namespaces ({e})"
    with contextlib.suppress(NetnsError):
        _ip("netns", "del", probe)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {e}") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass(frozen=True)
class Plan:
    """Everything a namespaced cluster makes (what `DIR/netns.json` records)."""

    tag: str
    slot: int
    bridge: str
    #: {process name: (namespace, outer veth, address, AZ)}
    processes: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)

    @property
    def gateways(self) -> list[str]:
        return [gateway(self.slot, az) for az in AZ_ORDER]

    @property
    def slot_network(self) -> str:
        return str(slot_network(self.slot))

    def namespace(self, name: str) -> str | None:
        entry = self.processes.get(name)
        return entry[0] if entry else None

    def address(self, name: str) -> str:
        return self.processes[name][2]

    def namespace_at(self, host: str) -> str | None:
        """The namespace whose address is `host` (a promoted reader's namespace serves the
        writer's entry: processes are placed by address, not by name)."""
        for ns, _veth, address, _az in self.processes.values():
            if address == host:
                return ns
        return None

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, "tag": self.tag, "slot": self.slot, "bridge": self.bridge,
                "processes": {k: list(v) for k, v in self.processes.items()}}

    @classmethod
    def from_json(cls, doc: dict, where: str) -> Plan:
        try:
            if doc.get("format") != RECORD_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, this release reads {RECORD_FORMAT}")
            procs = {str(k): tuple(str(x) for x in v) for k, v in doc["processes"].items()}
            if any(len(v) != 4 or not v[0].startswith(NS_PREFIX) for v in procs.values()):
                raise ValueError("a process entry is not [namespace, veth, address, az]")
            plan = cls(str(doc["tag"]), int(doc["slot"]), str(doc["bridge"]), procs)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise NetnsError(f"{where} is not a namespace record ({e}); remove what it made by hand "
                             f"(`ip netns list | grep {NS_PREFIX}`) and delete the file") from None
        if not plan.bridge.startswith("sfb") or not 0 <= plan.slot < SLOTS:
            raise NetnsError(f"{where} names bridge {plan.bridge!r} and slot {plan.slot}, which no launcher makes")
        return plan


def slot_network(slot: int) -> ipaddress.IPv4Network:
    assert 0 <= slot < SLOTS, slot
    return ipaddress.ip_network((int(RANGE.network_address) + slot * SLOT_SUBNETS * 256, 32 - 10))


def az_subnet(slot: int, az: str) -> ipaddress.IPv4Network:
    if az not in AZ_ORDER:
        raise NetnsError(f"AZ {az!r}: a namespaced cluster has AZs {', '.join(AZ_ORDER)}")
    base = int(slot_network(slot).network_address) + (AZ_ORDER.index(az) + 1) * 256
    return ipaddress.ip_network((base, 24))


def slot_of(host: str) -> int:
    """The slot of an address a namespaced cluster gave out (NetnsError for any other)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or ip not in RANGE:
        raise NetnsError(f"{host} is no address of a namespaced cluster ({RANGE})")
    return (int(ip) - int(RANGE.network_address)) // (SLOT_SUBNETS * 256)


def gateway(slot: int, az: str) -> str:
    return str(az_subnet(slot, az).network_address + GATEWAY_HOST)


def _used_addresses() -> set[ipaddress.IPv4Address]:
    out = _ip("-o", "-4", "addr", "show").stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            with contextlib.suppress(ValueError):
                used.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip)
    return used


def _free_slot(taken_slots: set[int]) -> int:
    used = _used_addresses()
    for slot in range(1, SLOTS):  # slot 0 is left to people's own experiments
        if slot in taken_slots:
            continue
        net = slot_network(slot)
        if not any(a in net for a in used):
            return slot
    raise NetnsError(f"no free /22 left in {RANGE} for a namespaced cluster (every slot has an address on this machine)")


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def record_path(folder: str) -> str:
    return os.path.join(folder, RECORD_FILE)


def load_record(folder: str) -> Plan | None:
    path = record_path(folder)
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NetnsError(f"cannot read {path}: {e}") from None
    return Plan.from_json(doc, path)


def _save_record(folder: str, plan: Plan) -> None:
    from engine.files import atomic_write

    atomic_write(record_path(folder), (json.dumps(plan.to_json(), indent=2, sort_keys=True) + "\n").encode())


def plan_for(processes: list[tuple[str, str]], *, tag: str | None = None, slot: int,
             addresses: dict[str, str] | None = None) -> Plan:
    """A plan for [(process name, AZ)] in `slot`: addresses .10, .11 ... per AZ in order, or
    the given `addresses` (a cluster's namespaces made again; each must lie in its AZ's subnet)."""
    if len(processes) > PROCESSES_MAX:
        raise NetnsError(f"at most {PROCESSES_MAX} processes in namespaces, got {len(processes)}")
    tag = tag or secrets.token_hex(3)
    assert len(tag) == 6 and all(c in "0123456789abcdef" for c in tag), tag
    next_host = {az: FIRST_HOST for az in AZ_ORDER}
    procs = {}
    for i, (name, az) in enumerate(processes):
        subnet = az_subnet(slot, az)
        if addresses is not None:
            address = addresses[name]
            try:
                inside = ipaddress.ip_address(address) in subnet
            except ValueError:
                inside = False
            if not inside:
                raise NetnsError(f"{name} is at {address}, outside its AZ {az}'s subnet {subnet}: this cluster's "
                                 "namespaces cannot be made again as they were")
        else:
            address = str(subnet.network_address + next_host[az])
            next_host[az] += 1
        procs[name] = (f"{NS_PREFIX}{tag}-{name}", f"sfv{tag}{i:02d}", address, az)
    return Plan(tag, slot, f"sfb{tag}", procs)


def create(folder: str, processes: list[tuple[str, str]], *, slot: int | None = None,
           addresses: dict[str, str] | None = None) -> Plan:
    """Plan, record, then make the bridge and a namespace per process (see the module
    docstring). On failure everything made is removed again (and the record with it)."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsError(reason)
    with machine_lock():
        if slot is not None and any(a in slot_network(slot) for a in _used_addresses()):
            raise NetnsError(f"the addresses of this cluster ({slot_network(slot)}) are in use on this machine (another "
                             "namespaced cluster took them while it was down?)")
        plan = plan_for(processes, slot=slot if slot is not None else _free_slot(set()), addresses=addresses)
        _save_record(folder, plan)  # first: a crash from here on leaves a record to tear down
        try:
            make(plan)
        except BaseException:
            teardown(folder)
            raise
    return plan


def add_process(folder: str, name: str, az: str) -> Plan:
    """A process added after `up` (a reader, a replacement node): the next address of its AZ
    and a veth of its own, recorded first, then made; returns the new plan."""
    with machine_lock():
        plan = load_record(folder)
        if plan is None:
            raise NetnsError(f"{folder} has no namespace record: is it a --netns cluster that is up?")
        if plan.namespace(name) is not None:
            return plan
        if len(plan.processes) >= PROCESSES_MAX:
            raise NetnsError(f"at most {PROCESSES_MAX} processes in namespaces")
        subnet = az_subnet(plan.slot, az)
        taken = {ipaddress.ip_address(v[2]) for v in plan.processes.values()}
        host = next(subnet.network_address + h for h in range(FIRST_HOST, GATEWAY_HOST)
                    if subnet.network_address + h not in taken)
        index = max((int(v[1][-2:]) for v in plan.processes.values()), default=-1) + 1
        if index > 99:
            raise NetnsError("no veth name left for a new process (100 made)")
        procs = dict(plan.processes)
        procs[name] = (f"{NS_PREFIX}{plan.tag}-{name}", f"sfv{plan.tag}{index:02d}", str(host), az)
        plan = Plan(plan.tag, plan.slot, plan.bridge, procs)
        _save_record(folder, plan)
        make(plan)
    return plan


def make(plan: Plan) -> None:
    """Make what `plan` names that does not exist yet (idempotent: `cluster up` after a reboot
    or a `cluster down` makes it again)."""
    if _ip("link", "show", plan.bridge, check=False).returncode != 0:
        _ip("link", "add", plan.bridge, "type", "bridge")
    for gw in plan.gateways:
        _ip("addr", "replace", f"{gw}/24", "dev", plan.bridge)
    _ip("link", "set", plan.bridge, "up")
    existing = set(_ip("netns", "list").stdout.split())
    for _name, (ns, veth, address, az) in plan.processes.items():
        if ns not in existing:
            _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        if _ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0:
            _ip("link", "del", veth, check=False)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", plan.bridge, "up")
        _ip("-n", ns, "addr", "replace", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "replace", plan.slot_network, "dev", "eth0")


def teardown(folder: str) -> list[str]:
    """Remove every namespace, veth and the bridge the folder's record names (whatever exists
    of them), then the record; returns what was removed. Nothing without a record."""
    plan = load_record(folder)
    if plan is None:
        return []
    removed = []
    existing = set(_ip("netns", "list").stdout.split()) if shutil.which("ip") else set()
    for _name, (ns, veth, _address, _az) in plan.processes.items():
        if ns in existing:
            # Whatever still runs in it is one of this cluster's processes, started by a launcher
            # that died before it recorded the pid: a deleted namespace would live on with it.
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
                    removed.append(f"pid {pid}")
            _ip("netns", "del", ns, check=False)  # its eth0 goes with it, and so the veth pair
            removed.append(ns)
        if _ip("link", "show", veth, check=False).returncode == 0:
            _ip("link", "del", veth, check=False)
            removed.append(veth)
    if _ip("link", "show", plan.bridge, check=False).returncode == 0:
        _ip("link", "del", plan.bridge, check=False)
        removed.append(plan.bridge)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(folder))
    return removed


def leftovers(plan: Plan) -> list[str]:
    """What of `plan` still exists (tests: empty after a teardown)."""
    existing = set(_ip("netns", "list").stdout.split())
    out = [ns for ns, *_ in plan.processes.values() if ns in existing]
    links = _ip("-o", "link", "show").stdout
    out += [name for name in [plan.bridge, *(v[1] for v in plan.processes.values())] if f" {name}:" in links or f" {name}@" in links]
    return out


def exec_prefix(plan: Plan | None, host: str) -> list[str]:
    """The command prefix that starts the process at address `host` in its namespace ([] when
    no namespace has that address)."""
    ns = plan.namespace_at(host) if plan is not None else None
    return [] if ns is None else ["ip", "netns", "exec", ns]


__all__ = ["NetnsError", "Plan", "RANGE", "create", "exec_prefix", "leftovers", "load_record", "make", "plan_for",
           "teardown", "unavailable_reason"]
