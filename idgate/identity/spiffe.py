"""SPIFFE IDs, parsed by the rules of the SPIFFE ID specification."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SpiffeId", "parse_spiffe_id"]

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/a/b"

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse `spiffe://trust-domain/path`; raise ValueError saying what is wrong."""
    if not value.startswith("spiffe://"):
        raise ValueError("a SPIFFE ID starts with `spiffe://`")
    rest = value[len("spiffe://") :]
    if any(c in rest for c in "?#@:%"):
        raise ValueError("a SPIFFE ID has no port, user info, query, fragment or escapes")
    domain, slash, path = rest.partition("/")
    if not domain or not _TRUST_DOMAIN.match(domain):
        raise ValueError("the trust domain must be lowercase letters, digits, `.`, `-` or `_`")
    if slash:
        for segment in path.split("/"):
            if not segment or segment in (".", "..") or not _SEGMENT.match(segment):
                raise ValueError("path segments must be non-empty, not `.` or `..`, of [A-Za-z0-9._-]")
        path = "/" + path
    return SpiffeId(domain, path)
