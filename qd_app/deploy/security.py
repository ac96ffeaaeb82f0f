"""Keys and certificates for a secure federation on this machine (a loopback demo).

A private certificate authority signs the SuperLink's TLS certificate (valid for
127.0.0.1 and localhost: Flower's own SuperExec reaches the SuperLink by IP); each
SuperNode gets an ECDSA key pair in OpenSSH format, the form Flower's SuperNode
authentication reads, and its public key is registered with the SuperLink. Across
machines, use certificates from your own authority for the SuperLink's host name.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..atomic import atomic_write_bytes

VALID_DAYS = 365


def write_certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a server certificate and key for the SuperLink signed by it; returns their paths
    (``ca``, ``certificate``, ``key``)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qd-app local federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "certificate": folder / "superlink.crt", "key": folder / "superlink.key"}
    atomic_write_bytes(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["certificate"], certificate.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def write_node_key(private_path: Path) -> Path:
    """An ECDSA key pair for one SuperNode (``<name>`` and ``<name>.pub``, OpenSSH format);
    returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write_bytes(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    private_path.chmod(0o600)
    public_path = private_path.with_name(private_path.name + ".pub")
    atomic_write_bytes(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return public_path
