"""Who is the writer: asked of the writer candidates a deployment spec names, not read from a file.

Theory of operation
-------------------
A launcher's cluster folder records who is the writer: a promoted reader or a standby that took
over writes its address, pid and epoch into `cluster.json`, and clients and readers read it
there. A deployment spec (`engine.cluster.spec`) is the operator's read-only file, copied to
every host (a ConfigMap, a file under /etc): nothing is recorded into it, and no two hosts share
a folder. So in spec mode the file only names the *candidates*, the writer and every active
reader (the processes that may serve as the writer: a reader promotes itself, the writer may
come back as a standby), and `WriterLocator.find()` asks each of them, in parallel, for its KV
`Status` (the call every endpoint answers, writer or reader):

* a process that answers with a writer status that is not fenced serves as the writer at its
  epoch; a reader answers with a reader status, a standby or a writer still recovering
  answers `Unavailable`, a dead host does not answer within `ASK_TIMEOUT_S`;
* of those serving as the writer, the one at the highest epoch is the writer. Two can answer at
  once only for a moment: the one of the older epoch was fenced by the newer one's seal (the
  epoch rule of `engine.head.failover`) and cannot confirm its lease any more, so it could not
  serve a read or make a write durable anyway.

The answer is a `WriterFound`: the address to dial and the writer's *identity*, (address, pid,
opened_at): the process and the moment its writer opened. `engine.client.FollowingBackend`
re-sends a write of unknown fate only to a writer of another identity (a new process, whose
recovery decided the write's fate); a pid alone is not enough across hosts and containers (every
container's first process is pid 1), but a writer that opened again opened at another time.

The file is read again on every question (it is small), so a reader added to the spec, or a
launcher folder's recorded writer, is asked from the next question on; an unreadable file keeps
the candidates of the last good read.

Rules of this module: it asks (KV Status, a channel per call, bounded) and records nothing.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from dataclasses import dataclass

import grpc

from engine.cluster.manifest import WRITER, WRITER_AZ_DEFAULT, ClusterError, active_readers, load_manifest_file
from engine.errors import SixfoldError, Unavailable, WrongFolder

log = logging.getLogger("sixfold.locate")

#: One candidate's Status answer is waited for at most this long: a host that is gone must not
#: hold up the question. Above the 2 s state deadline of a writer's transport
#: (`grpc_client.Deadlines.state_s`): a writer's Status asks its nodes, and one node cut off must
#: not make the writer look silent.
ASK_TIMEOUT_S = 3.0
#: The most candidates asked (the writer and at most 15 readers: engine.cluster.spec).
CANDIDATES_MAX = 16


@dataclass(frozen=True)
class Candidate:
    """A process that may serve as the writer: its id in the file, AZ and address."""

    id: str
    az: str
    address: str


@dataclass(frozen=True)
class WriterFound:
    """The process serving as the writer at the highest epoch, as it answered."""

    candidate: Candidate
    epoch: int
    pid: int
    opened_at: float | None

    @property
    def address(self) -> str:
        return self.candidate.address

    @property
    def identity(self) -> tuple:
        """(address, pid, opened_at): one writer process's one opening (see the module docstring)."""
        return (self.candidate.address, self.pid, self.opened_at)


def candidates(manifest: dict) -> list[Candidate]:
    """The writer candidates a manifest names: the writer, then every active reader (by address,
    each once: a launcher folder names a promoted reader as the writer)."""
    w = manifest[WRITER]
    out = [Candidate(WRITER, w.get("az") or WRITER_AZ_DEFAULT, w["address"])]
    for r in active_readers(manifest):
        if all(c.address != r["address"] for c in out):
            out.append(Candidate(r["id"], r["az"], r["address"]))
    return out[:CANDIDATES_MAX]


def serving_writer(status: dict) -> int | None:
    """The epoch a KV `Status` answer (the dict of `convert.status_from_pb`) serves as the
    writer at; None for a reader's answer or a fenced writer's."""
    w = status.get("writer")
    if w is None or "reader" in status or w.get("fenced"):
        return None
    return int(status["epoch"])


def pick(answers: list[tuple[Candidate, dict | None]]) -> WriterFound | None:
    """Of (candidate, Status answer or None), the one serving as the writer at the highest
    epoch (the first of them in the file's order on a tie); None when none does."""
    best: WriterFound | None = None
    for c, st in answers:
        if st is None:
            continue
        epoch = serving_writer(st)
        if epoch is None:
            continue
        if best is None or epoch > best.epoch:
            ep = st.get("endpoint") or {}
            best = WriterFound(c, epoch, int(ep.get("pid") or 0), ep.get("opened_at"))
    return best


class WriterLocator:
    """Finds the writer of the cluster a manifest file names by asking its candidates (see the
    module docstring). `tls` (an `engine.security.tls.TlsConfig` or None) and `token` are the
    caller's: Status is open to every certificate role and to the token role `read`."""

    def __init__(self, manifest_file: str, folder: str | None = None, *, tls=None, token: str | None = None,
                 timeout_s: float = ASK_TIMEOUT_S) -> None:
        self.manifest_file = os.path.abspath(manifest_file)
        self.folder = folder or os.path.dirname(self.manifest_file)
        self.tls = tls
        self.timeout_s = timeout_s
        from engine.security.users import bearer

        self._metadata = bearer(token) if token else None
        self._manifest = load_manifest_file(self.manifest_file, self.folder)
        #: the last answer found, for `writer_az` (None before one)
        self.last: WriterFound | None = None

    def manifest(self) -> dict:
        """The file as it is now (the last good read if it cannot be read)."""
        try:
            self._manifest = load_manifest_file(self.manifest_file, self.folder)
        except (ClusterError, WrongFolder, OSError, ValueError) as e:
            log.warning("cannot re-read %s (asking the candidates it named before): %s", self.manifest_file, e)
        return self._manifest

    def candidates(self) -> list[Candidate]:
        return candidates(self.manifest())

    def ask(self, address: str) -> dict | None:
        """One candidate's KV Status (None: it does not answer, or answers with an error)."""
        from engine.proto import kv_pb2, kv_pb2_grpc
        from engine.security.tls import secure_channel
        from engine.transport import convert

        try:
            with secure_channel(address, self.tls) as ch:
                reply = kv_pb2_grpc.KVStub(ch).Status(kv_pb2.StatusRequest(), timeout=self.timeout_s,
                                                     metadata=self._metadata)
            return convert.status_from_pb(reply)
        except grpc.RpcError:
            return None  # gone, still recovering (Unavailable), a standby: not the writer now
        except SixfoldError:
            return None  # an answer that does not convert (another release): not one to follow

    def find(self) -> WriterFound | None:
        """The process serving as the writer at the highest epoch now, or None."""
        cs = self.candidates()
        with futures.ThreadPoolExecutor(max_workers=len(cs), thread_name_prefix="locate") as pool:
            answers = list(zip(cs, pool.map(lambda c: self.ask(c.address), cs)))
        found = pick(answers)
        if found is not None:
            self.last = found
        return found

    def locate(self) -> WriterFound:
        """`find()`, or Unavailable naming whom it asked."""
        found = self.find()
        if found is None:
            asked = ", ".join(f"{c.id} at {c.address}" for c in self.candidates())
            raise Unavailable(f"no writer candidate of {self.manifest_file} serves as the writer now (asked {asked}); "
                              "a failover takes about a lease period")
        return found

    def writer_address(self) -> str:
        """The writer's address to dial: the one found, else the file's writer (a cluster
        starting: its writer is still recovering)."""
        found = self.find()
        return found.address if found is not None else self.manifest()[WRITER]["address"]

    def writer_az(self) -> str:
        """The AZ of the writer last found, else the file's writer's (a candidate in the
        writer's AZ waits longer: engine.head.failover)."""
        found = self.last
        if found is not None:
            return found.candidate.az
        return self.manifest()[WRITER].get("az") or WRITER_AZ_DEFAULT


__all__ = ["ASK_TIMEOUT_S", "Candidate", "WriterFound", "WriterLocator", "candidates", "pick", "serving_writer"]
