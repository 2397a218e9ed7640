"""Vehicle authentication: per-vehicle bearer tokens (stored as SHA-256 hashes) and optional mTLS identities.

Token file (JSON): {"veh-0001": "sha256:<hex digest of the token>", ...}. Tokens are 256-bit random strings, so a
plain SHA-256 is the right hash: a slow password hash would only add latency to every stream.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import socket
from pathlib import Path

PREFIX = "sha256:"


def hash_token(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class TokenStore:
    """Maps a presented bearer token to the vehicle it belongs to."""

    def __init__(self, hashes: dict[str, str]) -> None:
        for vehicle, h in hashes.items():
            if not isinstance(h, str) or not h.startswith(PREFIX) or len(h) != len(PREFIX) + 64:
                raise ValueError(f"token hash of {vehicle!r} must be 'sha256:<64 hex digits>'")
        self._by_hash = {h: v for v, h in hashes.items()}

    @classmethod
    def load(cls, path: Path) -> "TokenStore":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read token file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"token file {path} must hold a JSON object vehicle_id -> hash")
        return cls(data)

    def vehicle_for(self, token: str) -> str | None:
        # Looking up the digest leaks nothing useful by timing: an attacker learns about hashes, not tokens.
        return self._by_hash.get(hash_token(token))


def issue_token(path: Path, vehicle_id: str) -> str:
    """Create (or rotate) the token of `vehicle_id` in the hashed token file; returns the plain token once."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    token = new_token()
    data[vehicle_id] = hash_token(token)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


def bearer(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` header, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


def certificate_name(context) -> str | None:
    """The common name of the client certificate of a gRPC call under mTLS, None without one."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def is_loopback(listen: str) -> bool:
    """Whether a `host:port` listen address accepts connections from this machine only (127.0.0.0/8, ::1, a name
    resolving there). An empty host, 0.0.0.0 or :: listens on every interface."""
    host = listen.rpartition(":")[0].strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False
