"""A throwaway PKI for mTLS tests: a CA, a server certificate for localhost and one client certificate per vehicle."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _cert(subject_cn: str, key, issuer_cn: str, issuer_key, ca: bool = False, sans=None, usage=None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path, vehicles: list[str]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    ca_key = _key()
    ca = _cert("flywheel test CA", ca_key, "flywheel test CA", ca_key, ca=True)
    out["ca.crt"] = root / "ca.crt"
    out["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name, cn, extra, usage in [("server", "localhost", sans, ExtendedKeyUsageOID.SERVER_AUTH)] + \
            [(v, v, None, ExtendedKeyUsageOID.CLIENT_AUTH) for v in vehicles]:
        key = _key()
        cert = _cert(cn, key, "flywheel test CA", ca_key, sans=extra, usage=usage)
        out[f"{name}.key"] = _write_key(root / f"{name}.key", key)
        out[f"{name}.crt"] = root / f"{name}.crt"
        out[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out
