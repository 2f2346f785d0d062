"""Real network faults in a `--netns` cluster: nft drop rules inside the processes' namespaces.

Theory of operation
-------------------
A fault is data, as in the chaos plans: `Cut(groups)` says who can reach whom. Each group is a
set of process names; a process reaches the processes of its own group, and nobody else's.
`OneWay(src, dst)` drops what `src` sends to `dst` (and only that). Processes named in no group
of a cut are cut from everyone (a node isolated alone). The machine's own namespace (the
client, the CLI, the launcher's health checks) is never cut: a fault separates the cluster's
processes from each other, as an AZ's links failing would, while the operator still sees it.

`NetFaults(folder).apply(faults)` turns the faults into one nft table per namespace,
`inet sixfold_faults`, with an input chain dropping packets from the addresses a process may not
hear and an output chain dropping those to the addresses it may not reach, both before
conntrack accepts anything, so established TCP connections stall exactly as on a cut link (a
drop, not a reset: gRPC sees deadlines, not refusals). Applying replaces every table at once
(`nft -f`, atomic per namespace); `heal()` deletes the tables. The namespaces' deletion by
`cluster down` removes any table left, so a crashed test leaks no rule.

Rules of this module: standard library, `engine.errors` and `engine.cluster.netns`; it runs
`nft` through `ip netns exec` and knows nothing of gRPC.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from engine.cluster.netns import NetnsError, Plan, load_record
from engine.errors import InvalidArgument

TABLE = "sixfold_faults"
NFT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Cut:
    """A partition: each group reaches only itself; a process in no group reaches nobody."""

    groups: tuple[frozenset[str], ...]

    @classmethod
    def of(cls, *groups: Iterable[str]) -> Cut:
        gs = tuple(frozenset(g) for g in groups)
        seen: set[str] = set()
        for g in gs:
            if seen & g:
                raise InvalidArgument(f"a process is in two groups of one cut: {sorted(seen & g)}")
            seen |= g
        return cls(gs)


@dataclass(frozen=True)
class OneWay:
    """What `src` sends to `dst` is dropped; `dst` to `src` still flows."""

    src: str
    dst: str


def blocked_pairs(faults: Iterable[Cut | OneWay], names: Iterable[str]) -> set[tuple[str, str]]:
    """Every (sender, receiver) pair of processes the faults stop, both directions of a cut."""
    names = sorted(names)
    out: set[tuple[str, str]] = set()
    for f in faults:
        if isinstance(f, OneWay):
            for n in (f.src, f.dst):
                if n not in names:
                    raise InvalidArgument(f"no process {n!r} in this cluster's namespaces ({', '.join(names)})")
            if f.src != f.dst:
                out.add((f.src, f.dst))
            continue
        group_of = {}
        for i, g in enumerate(f.groups):
            for n in g:
                if n not in names:
                    raise InvalidArgument(f"no process {n!r} in this cluster's namespaces ({', '.join(names)})")
                group_of[n] = i
        for a in names:
            for b in names:
                if a != b and (a not in group_of or b not in group_of or group_of[a] != group_of[b]):
                    out.add((a, b))
    return out


def ruleset(plan: Plan, name: str, pairs: set[tuple[str, str]]) -> str:
    """The nft script of one process's namespace: replace its table with the drops it needs."""
    deaf = sorted(plan.address(a) for a, b in pairs if b == name)
    mute = sorted(plan.address(b) for a, b in pairs if a == name)
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    lines.append("  chain input { type filter hook input priority -300; policy accept;"
                 + (f" ip saddr {{ {', '.join(deaf)} }} drop;" if deaf else "") + " }")
    lines.append("  chain output { type filter hook output priority -300; policy accept;"
                 + (f" ip daddr {{ {', '.join(mute)} }} drop;" if mute else "") + " }")
    lines.append("}")
    return "\n".join(lines) + "\n"


class NetFaults:
    """The real network faults of one `--netns` cluster folder (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        plan = load_record(folder)
        if plan is None:
            raise NetnsError(f"{folder} is not a --netns cluster that is up (no namespace record): real network "
                             "faults need `sixfold cluster up --netns`")
        if shutil.which("nft") is None:
            raise NetnsError("the `nft` command (nftables) is not installed")
        self.plan = plan
        self.active: list[Cut | OneWay] = []
        #: how many times faults that block something were put in force (a run's stats)
        self.cuts_applied = 0

    def refresh(self) -> None:
        """Re-read the namespace record: processes added since (a reader, a replacement node)."""
        plan = load_record(self.folder)
        if plan is not None:
            self.plan = plan

    @property
    def names(self) -> list[str]:
        return sorted(self.plan.processes)

    def _nft(self, name: str, script: str) -> None:
        ns = self.plan.namespace(name)
        try:
            proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True,
                                  text=True, timeout=NFT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NetnsError(f"nft in {ns} failed: {e}") from None
        if proc.returncode != 0:
            raise NetnsError(f"nft in {ns} failed: {proc.stderr.strip()}")

    def apply(self, faults: Iterable[Cut | OneWay]) -> set[tuple[str, str]]:
        """Make exactly `faults` hold (replacing what held before); returns the blocked pairs."""
        faults = list(faults)
        self.refresh()
        pairs = blocked_pairs(faults, self.names)
        for name in self.names:
            self._nft(name, ruleset(self.plan, name, pairs))
        self.active = faults
        self.cuts_applied += bool(pairs)
        return pairs

    def add(self, fault: Cut | OneWay) -> set[tuple[str, str]]:
        return self.apply([*self.active, fault])

    def heal(self) -> None:
        """Remove every fault: each namespace's table goes."""
        self.refresh()
        for name in self.names:
            self._nft(name, f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
        self.active = []

    # --- the partitions of issue 15, by name ------------------------------------------------
    def cut_az(self, az: str, *, also: Iterable[str] = ()) -> set[tuple[str, str]]:
        """AZ `az` cut off from the other AZs (its processes still reach each other); `also`:
        processes of other AZs isolated alone as well (an AZ plus one node)."""
        also = set(also)
        inside = {n for n, v in self.plan.processes.items() if v[3] == az and n not in also}
        outside = {n for n, v in self.plan.processes.items() if v[3] != az and n not in also}
        if not inside:
            raise InvalidArgument(f"no process in AZ {az!r}")
        return self.add(Cut.of(inside, outside))

    def isolate(self, name: str) -> set[tuple[str, str]]:
        return self.add(Cut.of([n for n in self.names if n != name]))

    def one_way(self, src: str, dst: str) -> set[tuple[str, str]]:
        return self.add(OneWay(src, dst))

    def table(self, name: str) -> str:
        """The fault table of one namespace as nft lists it ("" when it has none)."""
        ns = self.plan.namespace(name)
        proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", TABLE], capture_output=True,
                              text=True, timeout=NFT_TIMEOUT_S)
        return proc.stdout if proc.returncode == 0 else ""


__all__ = ["TABLE", "Cut", "NetFaults", "OneWay", "blocked_pairs", "ruleset"]
