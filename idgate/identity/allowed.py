"""Who is on a list: subjects and groups named issuer-qualified, `ISSUER_NAME:VALUE`.

Administrators, introspecting resource servers and AuthZEN askers are such
lists. An id alone means nothing: another trusted issuer may have a subject or
a group of the same name, so every entry names the issuer (by its configured
name) whose principals it means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from idgate.identity.issuers import OidcIssuer, SpiffeIssuer, TokenIssuer
from idgate.identity.principal import Principal

__all__ = ["Allowed", "issuer_names"]


class Allowed:
    """A list of subjects and groups, each issuer-qualified (`ISSUER_NAME:VALUE`), and who is on it."""

    def __init__(
        self, subjects: tuple[str, ...], groups: tuple[str, ...], issuers: Mapping[str, str], what: str = "list"
    ) -> None:
        """`issuers`: each trusted issuer's name, and the issuer its principals carry (`Principal.issuer`).
        Raises `ValueError` for an entry naming no such issuer (`what`: the config key, for the message)."""
        self._subjects = frozenset(_resolve(subjects, issuers, f"{what}.subjects"))
        self._groups = frozenset(_resolve(groups, issuers, f"{what}.groups"))

    def admits(self, principal: Principal) -> bool:
        if (principal.issuer, principal.id) in self._subjects:
            return True
        return bool(self._groups) and any((principal.issuer, group) in self._groups for group in principal.groups)


def _resolve(entries: tuple[str, ...], issuers: Mapping[str, str], what: str) -> list[tuple[str, str]]:
    resolved = []
    for entry in entries:
        name, _, value = entry.partition(":")
        if name not in issuers:
            known = ", ".join(sorted(issuers)) or "none"
            raise ValueError(f"{what}: `{entry[:80]}` names issuer `{name}`, which is not configured ({known})")
        resolved.append((issuers[name], value))
    return resolved


def issuer_names(issuers: Sequence[TokenIssuer]) -> dict[str, str]:
    """Each trusted issuer's configured name, and the issuer its principals carry (`Principal.issuer`)."""
    names: dict[str, str] = {}
    for issuer in issuers:
        if isinstance(issuer, OidcIssuer):
            names[issuer.name] = issuer.issuer
        elif isinstance(issuer, SpiffeIssuer):
            names[issuer.name] = f"spiffe://{issuer.trust_domain}"
    return names
