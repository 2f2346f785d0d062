"""gRPC credentials of one identity: mutual TLS for every channel and server of a cluster.

Theory of operation
-------------------
`TlsConfig(folder, identity, cluster_id)` names an identity file of a cluster's `tls/` folder
(`certs.TlsFolder`): its certificate and key, and the trust bundle `ca.pem`. It makes

* `server_credentials()`: `grpc.dynamic_ssl_server_credentials` with client certificates
  required and checked against the bundle. gRPC calls the fetch callback before each new
  connection's handshake; the callback stats the two files and returns a new configuration only
  when one changed (`generation`), so a server picks up a rotated certificate or bundle with no
  restart and at the cost of two `stat`s per connection. A plaintext client, a client without a
  certificate, or one whose certificate no trusted CA signed (another cluster's, an expired
  one) is refused at the handshake: no RPC handler ever runs for it.
* `channel_credentials()`: `grpc.ssl_channel_credentials` with this identity's certificate
  (the client half of mTLS) and the bundle as roots. gRPC checks the server's certificate and
  that it names the host dialled (every certificate carries 127.0.0.1 and localhost).
  A client reads the files once per channel; `changed()` (at most one `stat` pair per
  `RELOAD_INTERVAL_S`) tells a long-lived transport to build new channels after a rotation.

`TlsConfig.for_cluster(folder, identity)` reads the cluster id from the manifest's volume id;
`None` means an insecure cluster (callers then use plaintext channels, as before).

Rules of this module: standard library, grpc and `engine.security.certs` only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from engine.security.certs import BUNDLE_FILE, TLS_DIR, CertificateError, split_pem

#: A client transport re-checks its files at most this often (see `changed`).
RELOAD_INTERVAL_S = 1.0


def _mtime(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    return st.st_mtime_ns ^ st.st_ino


@dataclass(frozen=True)
class TlsConfig:
    """The TLS material of one identity of one cluster (see the module docstring)."""

    #: the cluster's `tls/` folder
    folder: str
    #: the identity file's name without `.pem` ("n1", "writer", "admin"...)
    identity: str
    #: the cluster id that certificates of this cluster carry in their URI (the volume id)
    cluster_id: str
    _seen: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def in_cluster(cls, cluster_folder: str | os.PathLike, identity: str, cluster_id: str) -> TlsConfig:
        return cls(os.path.join(os.path.abspath(os.fspath(cluster_folder)), TLS_DIR), identity, cluster_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TlsConfig:
        """The identity in file `path` (certificate and key, as `sixfold certs issue` writes it),
        with the trust bundle `ca.pem` beside it; the cluster id is read from the certificate."""
        from engine.security.certs import certificates_in

        path = os.path.abspath(os.fspath(path))
        try:
            with open(path, "rb") as fh:
                certs = certificates_in(fh.read())
        except OSError as e:
            raise CertificateError(f"cannot read the certificate file {path}: {e.strerror}") from None
        if not certs or not path.endswith(".pem"):
            raise CertificateError(f"{path} is not an identity file (a .pem with a certificate and its key)")
        from cryptography import x509

        cluster = ""
        try:
            sans = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
                if uri.startswith("sixfold://"):
                    cluster = uri[len("sixfold://"):].split("/")[0]
        except x509.ExtensionNotFound:
            pass
        if not cluster:
            raise CertificateError(f"{path} holds no Sixfold certificate (no sixfold:// URI)")
        return cls(os.path.dirname(path), os.path.basename(path)[: -len(".pem")], cluster)

    @property
    def identity_path(self) -> str:
        return os.path.join(self.folder, self.identity + ".pem")

    @property
    def bundle_path(self) -> str:
        return os.path.join(self.folder, BUNDLE_FILE)

    @property
    def revoked_path(self) -> str:
        from engine.security.certs import REVOKED_FILE

        return os.path.join(self.folder, REVOKED_FILE)

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(private key PEM, certificate chain PEM, trust bundle PEM); CertificateError when a
        file is missing or holds no certificate or key."""
        try:
            with open(self.identity_path, "rb") as fh:
                chain, key = split_pem(fh.read())
            with open(self.bundle_path, "rb") as fh:
                roots = fh.read()
        except FileNotFoundError as e:
            raise CertificateError(f"TLS file {e.filename} is missing; issue it with "
                                   f"`sixfold certs issue {self.identity} --role ROLE` (or start the cluster with --insecure)") from None
        if not chain or not key or b"CERTIFICATE" not in roots:
            raise CertificateError(f"{self.identity_path} must hold a certificate and its key, {self.bundle_path} a CA certificate")
        return key, chain, roots

    def generation(self) -> tuple[int, int]:
        """Changes whenever the identity file or the bundle is replaced."""
        return _mtime(self.identity_path), _mtime(self.bundle_path)

    def changed(self, key: str = "client") -> bool:
        """True once after the files changed since the last call with this `key` (checked at
        most once per RELOAD_INTERVAL_S; the first call records and answers False)."""
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < RELOAD_INTERVAL_S:
            return False
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < RELOAD_INTERVAL_S:
                return False
            gen = self.generation()
            self._seen[key] = (now, gen)
            return seen is not None and seen[1] != gen

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, chain, roots = self.load()
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)

    def _server_config(self):
        key, chain, roots = self.load()
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def server_credentials(self) -> grpc.ServerCredentials:
        state = {"gen": self.generation()}
        initial = self._server_config()
        lock = threading.Lock()

        def fetch():
            gen = self.generation()
            if gen == state["gen"]:
                return None
            with lock:
                try:
                    config = self._server_config()
                except (CertificateError, OSError, ValueError):
                    return None  # a file half-way through a change: keep the current one
                state["gen"] = gen
                return config

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def secure_channel(address: str, tls: TlsConfig | None, options=()) -> grpc.Channel:
    """A channel to `address`: mTLS with `tls`, plaintext when it is None."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def aio_channel(address: str, tls: TlsConfig | None, options=()) -> grpc.aio.Channel:
    """`secure_channel` for grpc.aio: create it in the event loop that will use it."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


__all__ = ["RELOAD_INTERVAL_S", "TlsConfig", "aio_channel", "secure_channel"]
