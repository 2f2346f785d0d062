"""The cluster's certificate authority and the certificate of every process, in `DIR/tls/`.

Theory of operation
-------------------
A secure cluster has its own certificate authority (CA), made by `sixfold cluster up` with the
`cryptography` package, and one certificate per identity: each storage node (role `node`, id
`n1`...), the writer endpoint (role `writer`), the operator (role `admin`, used by the launcher,
the CLI and `engine.connect(cluster_folder)`), and any later `reader` or `client` identity that
`sixfold certs issue` makes. The role and id are in the certificate, three times over, so any
TLS peer can read them without a lookup:

    subject   CN=<id>, OU=<role>, O=sixfold cluster <cluster id>
    SAN URI   sixfold://<cluster id>/<role>/<id>      (what `roles.identity_from_pem` reads)
    SAN DNS   localhost, SAN IP 127.0.0.1, and the hosts of the process's own address (and its
              listen address), so hostname checks pass wherever it runs

Keys are ECDSA P-256 (a handshake costs well under a millisecond, RSA-2048 several); every
certificate is valid for both TLS client and server use, since every process is both.

Files (`TlsFolder`), all written with `engine.files.atomic_write` (a reader sees a whole file,
old or new, never a mix; that is why a certificate and its key share one file):

    tls/ca.pem          the trust bundle: every CA certificate a process accepts (one, or two
                        while a rotation is under way)
    tls/ca-key.pem      the current CA's certificate and private key (mode 0600): it signs
    tls/<id>.pem        an identity's certificate and private key (mode 0600)
    tls/revoked.json    serial numbers taken out of service (`revoke`), with id and time

Rotation (`rotate`) makes a new CA, adds it to the bundle beside the old one, waits for the
processes to re-read the bundle (`RELOAD_WAIT_S`: servers read it on each new connection, client
transports at most once per `tls.RELOAD_INTERVAL_S`), then reissues every identity under the new
CA. Old and new certificates are both accepted until `rotate --finish` drops the old CA from
the bundle: by then every running process has re-read its own file. Revocation writes the
serial to `revoked.json`; every server's interceptor re-reads that file when it changes
(`roles.RevocationList`) and refuses the serial on its next call, open connections included.

Rules of this module: standard library, `cryptography`, `engine.errors` and `engine.files`
only. It knows files and certificates, not gRPC (that is `tls.py`) or policy (`roles.py`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.errors import InvalidArgument, SixfoldError
from engine.files import atomic_write

TLS_DIR = "tls"
BUNDLE_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
REVOKED_FILE = "revoked.json"
URI_SCHEME = "sixfold"
#: Roles a certificate can name (what `roles.py` authorises).
ROLES = ("node", "writer", "reader", "admin", "client")
CA_DAYS = 3650
CERT_DAYS = 365
#: `cluster status` warns this many days before a certificate expires.
EXPIRY_WARNING_DAYS = 30
#: How long `rotate` waits between trusting the new CA and reissuing: longer than a client
#: transport takes to re-read its files (`tls.RELOAD_INTERVAL_S`), with room for a busy box.
RELOAD_WAIT_S = 3.0
#: Ids and roles appear in file names and URIs: the rule of node ids.
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\n?", re.S)


class CertificateError(SixfoldError):
    """The cluster's TLS material is missing, unreadable or does not fit the request (no CA, an
    unknown id, a file that holds no certificate...). The message says what to run."""

    GRPC_STATUS = "FAILED_PRECONDITION"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{what} must be 1..64 ASCII letters, digits, - or _, got {value!r}")
    return value


def split_pem(data: bytes) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM) of a combined file; either may be empty."""
    return b"".join(m.group(0) for m in _PEM_CERT.finditer(data)), b"".join(m.group(0) for m in _PEM_KEY.finditer(data))


def certificates_in(data: bytes) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(m.group(0)) for m in _PEM_CERT.finditer(data)]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(cluster_id: str, *, days: int = CA_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA for the cluster (its serial makes each CA of one cluster distinct)."""
    key = _new_key()
    now = _utcnow()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"sixfold cluster {cluster_id}"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"sixfold CA {now:%Y-%m-%d %H:%M:%S}"),
    ])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate, ca_key, cluster_id: str, role: str, ident: str, *, days: int = CERT_DAYS,
    hosts: tuple[str, ...] = (), not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `ident` in `role`, signed by the CA. `not_after`
    overrides `days` (a test issues an expired certificate so)."""
    _check_name(ident, "a certificate id")
    if role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    key = _new_key()
    now = _utcnow()
    not_before = not_before or now - datetime.timedelta(minutes=5)
    not_after = not_after or now + datetime.timedelta(days=days)
    if not_after <= not_before:
        not_before = not_after - datetime.timedelta(days=1)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"{URI_SCHEME}://{cluster_id}/{role}/{ident}"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                sans.append(x509.DNSName(host))
        else:
            if str(ip) != "127.0.0.1":
                sans.append(x509.IPAddress(ip))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"sixfold cluster {cluster_id}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, ident),
        ]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


@dataclass(frozen=True)
class CertInfo:
    """What `list` shows of one identity file."""

    id: str
    role: str
    serial: str  # hex
    not_after: float  # unix seconds
    issuer: str
    revoked: bool
    path: str

    def days_left(self, now: float | None = None) -> float:
        return (self.not_after - (time.time() if now is None else now)) / 86400


def role_of(cert: x509.Certificate) -> tuple[str, str]:
    """(role, id) from the subject (OU, CN)."""
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(ou[0].value) if ou else ""), (str(cn[0].value) if cn else "")


class TlsFolder:
    """The TLS material of one cluster folder (see the module docstring)."""

    def __init__(self, cluster_folder: str | os.PathLike, cluster_id: str, *, path: str | None = None) -> None:
        self.cluster_folder = os.path.abspath(os.fspath(cluster_folder))
        #: DIR/tls/, or the folder a deployment spec names (`tls_dir`)
        self.path = os.path.abspath(path) if path else os.path.join(self.cluster_folder, TLS_DIR)
        self.cluster_id = cluster_id

    # --- paths ------------------------------------------------------------------------------
    @property
    def bundle_path(self) -> str:
        return os.path.join(self.path, BUNDLE_FILE)

    @property
    def ca_key_path(self) -> str:
        return os.path.join(self.path, CA_KEY_FILE)

    @property
    def revoked_path(self) -> str:
        return os.path.join(self.path, REVOKED_FILE)

    def identity_path(self, ident: str) -> str:
        return os.path.join(self.path, _check_name(ident, "a certificate id") + ".pem")

    @property
    def exists(self) -> bool:
        return os.path.exists(self.bundle_path) and os.path.exists(self.ca_key_path)

    # --- the CA -----------------------------------------------------------------------------
    def _write_secret(self, path: str, data: bytes) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        atomic_write(path, data, mode=0o600)

    def _write_public(self, path: str, data: bytes) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        atomic_write(path, data, mode=0o644)

    def create_ca(self) -> x509.Certificate:
        """A new CA, trusted alone (for a new cluster). Existing identity files are left."""
        cert, key = make_ca(self.cluster_id)
        self._write_secret(self.ca_key_path, _cert_pem(cert) + _key_pem(key))
        self._write_public(self.bundle_path, _cert_pem(cert))
        return cert

    def ca(self) -> tuple[x509.Certificate, object]:
        try:
            with open(self.ca_key_path, "rb") as fh:
                chain, key_pem = split_pem(fh.read())
        except FileNotFoundError:
            raise CertificateError(f"{self.path} has no certificate authority ({CA_KEY_FILE}); "
                                   "`sixfold cluster up` makes one for a new secure cluster") from None
        return x509.load_pem_x509_certificate(chain), serialization.load_pem_private_key(key_pem, None)

    def trusted(self) -> list[x509.Certificate]:
        try:
            with open(self.bundle_path, "rb") as fh:
                return certificates_in(fh.read())
        except FileNotFoundError:
            return []

    # --- identities -------------------------------------------------------------------------
    def issue(self, ident: str, role: str, *, days: int = CERT_DAYS, hosts: tuple[str, ...] = (),
              not_after: datetime.datetime | None = None, out: str | None = None) -> str:
        """Issue (or replace) the certificate of `ident`; returns the file written."""
        ca_cert, ca_key = self.ca()
        cert, key = issue_certificate(ca_cert, ca_key, self.cluster_id, role, ident, days=days, hosts=hosts,
                                      not_after=not_after)
        path = out or self.identity_path(ident)
        if out:
            atomic_write(path, cert + key, mode=0o600)
        else:
            self._write_secret(path, cert + key)
        return path

    def ensure(self, identities: dict[str, str], hosts: tuple[str, ...] = (),
               hosts_of: dict[str, tuple[str, ...]] | None = None) -> list[str]:
        """Make the CA if there is none and a certificate for every {id: role} that has none;
        returns the ids issued. Each names `hosts` and its own `hosts_of[id]` (the hosts of
        the process it is for: `engine.cluster.manifest.identity_hosts`)."""
        if not self.exists:
            self.create_ca()
        issued = []
        for ident, role in identities.items():
            if not os.path.exists(self.identity_path(ident)):
                own = tuple((hosts_of or {}).get(ident, ()))
                self.issue(ident, role, hosts=tuple(dict.fromkeys(hosts + own)))
                issued.append(ident)
        return issued

    def hosts_of(self, ident: str) -> list[str]:
        """The IP addresses and DNS names the certificate of `ident` names (tests, `certs list`)."""
        with open(self.identity_path(ident), "rb") as fh:
            cert = certificates_in(fh.read())[0]
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(v) for v in sans.get_values_for_type(x509.IPAddress)] + list(sans.get_values_for_type(x509.DNSName))

    def identity_files(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        skip = {BUNDLE_FILE, CA_KEY_FILE}
        return sorted(os.path.join(self.path, f) for f in os.listdir(self.path) if f.endswith(".pem") and f not in skip)

    def info(self, path: str) -> CertInfo:
        with open(path, "rb") as fh:
            certs = certificates_in(fh.read())
        if not certs:
            raise CertificateError(f"{path} holds no certificate")
        cert = certs[0]
        role, ident = role_of(cert)
        serial = format(cert.serial_number, "x")
        return CertInfo(ident, role, serial, cert.not_valid_after_utc.timestamp(), cert.issuer.rfc4514_string(),
                        serial in self.revoked(), path)

    def list(self) -> list[CertInfo]:
        return [self.info(p) for p in self.identity_files()]

    def expiring(self, days: float = EXPIRY_WARNING_DAYS, now: float | None = None) -> list[str]:
        """One sentence per certificate (CAs included) that expires within `days`."""
        now = time.time() if now is None else now
        out = []
        for cert in self.trusted():
            left = (cert.not_valid_after_utc.timestamp() - now) / 86400
            if left < days:
                out.append(f"the CA {cert.subject.rfc4514_string()} expires in {left:.0f} days")
        for c in self.list():
            left = c.days_left(now)
            if left < days and not c.revoked:
                out.append(f"the certificate of {c.id} ({c.role}) "
                           + ("has expired" if left < 0 else f"expires in {left:.0f} days")
                           + f"; renew it with `sixfold certs issue {c.id} --role {c.role}` or `sixfold certs rotate`")
        return out

    # --- revocation -------------------------------------------------------------------------
    def revoked(self) -> dict[str, dict]:
        """{hex serial: {id, revoked_at}} (empty when nothing was revoked)."""
        try:
            with open(self.revoked_path, "rb") as fh:
                data = json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CertificateError(f"cannot read {self.revoked_path}: {e}") from None
        serials = data.get("serials") if isinstance(data, dict) else None
        return dict(serials) if isinstance(serials, dict) else {}

    def revoke(self, ident: str, *, serial: str | None = None) -> str:
        """Take the certificate of `ident` (or the one with `serial`) out of service; returns the
        serial revoked. The caller holds the cluster lock (one writer of revoked.json)."""
        if serial is None:
            path = self.identity_path(ident)
            if not os.path.exists(path):
                raise CertificateError(f"no certificate for {ident!r} in {self.path}; "
                                       f"ids are {', '.join(c.id for c in self.list()) or 'none'}")
            serial = self.info(path).serial
        serials = self.revoked()
        serials[serial.lower()] = {"id": ident, "revoked_at": time.time()}
        self._write_public(self.revoked_path, (json.dumps({"serials": serials}, indent=2, sort_keys=True) + "\n").encode())
        return serial.lower()

    # --- rotation ---------------------------------------------------------------------------
    def rotate(self, *, hosts: tuple[str, ...] = (), hosts_of: dict[str, tuple[str, ...]] | None = None,
               wait_s: float = RELOAD_WAIT_S, sleep=time.sleep) -> list[str]:
        """New CA trusted beside the old, a pause for every process to re-read the bundle, then
        every identity reissued under the new CA (same id, role and lifetime). Returns the ids."""
        old = self.trusted()
        if not old:
            raise CertificateError(f"{self.path} has no trust bundle; this cluster is not secure (`cluster up --insecure`)")
        cert, key = make_ca(self.cluster_id)
        self._write_public(self.bundle_path, b"".join(_cert_pem(c) for c in old) + _cert_pem(cert))
        sleep(wait_s)  # every server and client transport trusts both CAs now
        self._write_secret(self.ca_key_path, _cert_pem(cert) + _key_pem(key))
        done = []
        for path in self.identity_files():
            c = self.info(path)
            if c.revoked or c.role not in ROLES or c.days_left() < 0:
                continue  # nothing to carry over: it is out of service already
            with open(path, "rb") as fh:
                first = certificates_in(fh.read())[0]
            days = max(1, round((first.not_valid_after_utc - first.not_valid_before_utc).total_seconds() / 86400))
            own = tuple((hosts_of or {}).get(c.id, ()))
            self.issue(c.id, c.role, days=days, hosts=tuple(dict.fromkeys(hosts + own)), out=path)
            done.append(c.id)
        return done

    def finish_rotation(self) -> int:
        """Trust only the current CA again; returns how many CAs were dropped."""
        current, _key = self.ca()
        old = self.trusted()
        self._write_public(self.bundle_path, _cert_pem(current))
        return sum(1 for c in old if c.serial_number != current.serial_number)


__all__ = ["CA_DAYS", "CERT_DAYS", "EXPIRY_WARNING_DAYS", "ROLES", "TLS_DIR", "CertInfo", "CertificateError", "TlsFolder",
           "issue_certificate", "make_ca", "role_of", "split_pem"]
