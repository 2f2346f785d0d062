"""Certificates for etcd over TLS in a benchmark (the `cryptography` package; throwaway, temporary).

`make_certs(folder)` writes a CA, one member certificate (serverAuth and clientAuth: members
present it to clients and to each other on the peer port; SAN IP 127.0.0.1 and DNS localhost)
and one client certificate, keys 0600. etcd then runs with its own flags for mutual TLS on both
the client and the peer URLs (`member_flags`), and the benchmark's gRPC client uses
`grpc.ssl_channel_credentials` with the client certificate (`channel_credentials`), as Sixfold's
default TLS is mutual on every channel. Nothing here is reused outside a benchmark run.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 2


@dataclass(frozen=True)
class EtcdTls:
    ca: str
    member_cert: str
    member_key: str
    client_cert: str
    client_key: str

    def member_flags(self) -> list[str]:
        """etcd's flags for mutual TLS on the client and the peer URLs."""
        return [
            "--cert-file", self.member_cert, "--key-file", self.member_key, "--trusted-ca-file", self.ca,
            "--client-cert-auth",
            "--peer-cert-file", self.member_cert, "--peer-key-file", self.member_key,
            "--peer-trusted-ca-file", self.ca, "--peer-client-cert-auth",
        ]

    def channel_credentials(self):
        import grpc

        def read(path: str) -> bytes:
            with open(path, "rb") as fh:
                return fh.read()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.client_key),
                                            certificate_chain=read(self.client_cert))

    def ssl_context(self) -> ssl.SSLContext:
        """For etcd's /metrics page over https (client certificate required there too)."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def _write(path: str, data: bytes, private: bool = False) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_certs(folder: str, host: str = "127.0.0.1") -> EtcdTls:
    os.makedirs(folder, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sixfold bench etcd CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(name: str, usages: list) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=DAYS))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    member_cert, member_key = leaf("etcd-member", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client_cert, client_key = leaf("bench-client", [ExtendedKeyUsageOID.CLIENT_AUTH])
    j = lambda n: os.path.join(folder, n)  # noqa: E731
    return EtcdTls(
        ca=_write(j("ca.pem"), ca.public_bytes(serialization.Encoding.PEM)),
        member_cert=_write(j("member.pem"), member_cert), member_key=_write(j("member-key.pem"), member_key, True),
        client_cert=_write(j("client.pem"), client_cert), client_key=_write(j("client-key.pem"), client_key, True),
    )
