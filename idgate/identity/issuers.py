"""Trusted issuers: each checks its own tokens' claims and maps them to a `Caller`.

`OidcIssuer` serves OIDC/JWT issuers (and the development issuer);
`SpiffeIssuer` serves a SPIFFE trust domain's JWT-SVIDs, following the JWT-SVID
specification: `sub` is a SPIFFE ID of the trust domain, `aud` and `exp` are
required, the key comes from the trust bundle (`use: jwt-svid`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from joserfc import jwk

from idgate.config import ClaimsConfig, IssuerConfig, SpiffeIssuerConfig
from idgate.errors import InvalidToken, shown
from idgate.identity.keys import KeySet, VerifyKey
from idgate.identity.principal import Actor, Caller, Credential, Kind, Principal
from idgate.identity.spiffe import parse_spiffe_id

__all__ = ["MAX_ACTOR_DEPTH", "OidcIssuer", "SpiffeIssuer", "TokenIssuer", "actor_chain"]

KINDS: tuple[str, ...] = get_args(Kind)
MAX_ACTOR_DEPTH = 8


def actor_chain(claims: dict[str, Any]) -> tuple[Actor, ...]:
    """The RFC 8693 `act` claim as a chain, outermost (current) actor first."""
    actors: list[Actor] = []
    act = claims.get("act")
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise InvalidToken("claim `act` must be an object with a `sub` string")
        if len(actors) == MAX_ACTOR_DEPTH:
            raise InvalidToken(f"claim `act` nests deeper than {MAX_ACTOR_DEPTH} actors")
        kind = act.get("kind", "agent")
        if kind not in KINDS:
            raise InvalidToken(f"`act.kind` `{shown(kind)}` must be one of human, service, agent")
        issuer = act.get("iss")
        actors.append(Actor(act["sub"], kind, issuer if isinstance(issuer, str) else None))
        act = act.get("act")
    return tuple(actors)


def _string(claims: dict[str, Any], name: str | None) -> str | None:
    if name is None:
        return None
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidToken(f"claim `{name}` must be a string")
    return value


def _confirmation(claims: dict[str, Any]) -> tuple[str | None, str | None]:
    """The key (`jkt`) or certificate (`x5t#S256`) thumbprint a token is bound to (RFC 7800 `cnf`)."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None, None
    if not isinstance(cnf, dict):
        raise InvalidToken("claim `cnf` must be an object")
    jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
    if jkt is None and x5t is None:
        # A confirmation method this gateway cannot check: refuse rather than accept it unbound.
        raise InvalidToken("claim `cnf` names no confirmation method this gateway supports (`jkt`, `x5t#S256`)")
    for name, value in (("jkt", jkt), ("x5t#S256", x5t)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidToken(f"claim `cnf.{name}` must be a non-empty string")
    return jkt, x5t


def _issued_at(claims: dict[str, Any]) -> float | None:
    iat = claims.get("iat")
    return float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None


class TokenIssuer:
    """What every trusted issuer does; subclasses map claims to a principal."""

    credential_kind: Literal["jwt", "jwt-svid", "dev"] = "jwt"

    def __init__(
        self,
        name: str,
        keys: KeySet,
        algorithms: tuple[str, ...],
        audiences: tuple[str, ...],
        hmac_key: VerifyKey | None = None,
    ) -> None:
        self.name = name
        self.keys = keys
        self.algorithms = frozenset(algorithms)
        self.audiences = frozenset(audiences)
        self._hmac_key = hmac_key

    async def key(self, alg: str, kid: str | None) -> tuple[str | None, VerifyKey]:
        """The key that verifies `alg`, and its id in the key set (None for the HMAC secret)."""
        if alg.startswith("HS"):
            if self._hmac_key is None:  # pragma: no cover - config forbids it
                raise InvalidToken(f"issuer `{self.name}` has no HMAC secret")
            return None, self._hmac_key
        return await self.keys.resolve(kid)

    def check_audience(self, claims: dict[str, Any]) -> None:
        aud = claims.get("aud")
        values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if not values:
            raise InvalidToken("token has no audience (`aud`)")
        if self.audiences.isdisjoint(v for v in values if isinstance(v, str)):
            accepted = ", ".join(f"`{a}`" for a in sorted(self.audiences))
            raise InvalidToken(f"token audience `{shown(aud)}` is not accepted; expected {accepted}")

    def caller(self, claims: dict[str, Any], token_id: str, expires_at: float) -> Caller:
        raise NotImplementedError

    def _credential(self, claims: dict[str, Any], token_id: str, expires_at: float) -> Credential:
        jti = claims.get("jti")
        jkt, x5t = _confirmation(claims)
        parents = claims.get("parents", [])
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise InvalidToken("claim `parents` must be a list of token ids")
        return Credential(
            kind=self.credential_kind,
            id=jti if isinstance(jti, str) and jti else token_id,
            issuer_name=self.name,
            expires_at=expires_at,
            binding="dpop" if jkt is not None else "mtls" if x5t is not None else "none",
            task=_string(claims, "task"),
            session=_string(claims, "sid"),
            parents=tuple(parents),
            jkt=jkt,
            x5t=x5t,
            issued_at=_issued_at(claims),
        )


class OidcIssuer(TokenIssuer):
    def __init__(
        self,
        config: IssuerConfig,
        keys: KeySet,
        audiences: tuple[str, ...],
        hmac_secret: str | None = None,
        credential_kind: Literal["jwt", "dev"] = "jwt",
        subject_issuer_claim: bool = False,
    ) -> None:
        """`subject_issuer_claim`: the subject's issuer is the `sub_id.iss` claim (RFC 9493
        `iss_sub` format) when present; only for the gateway's own tokens, which carry the
        identity provider a subject came from."""
        hmac_key = jwk.OctKey.import_key(hmac_secret) if hmac_secret else None
        super().__init__(config.name, keys, config.algorithms, config.audiences or audiences, hmac_key)
        self.issuer = config.issuer
        self.claims = config.claims
        self.credential_kind = credential_kind
        self._subject_issuer_claim = subject_issuer_claim

    def caller(self, claims: dict[str, Any], token_id: str, expires_at: float) -> Caller:
        mapping: ClaimsConfig = self.claims
        subject = _string(claims, mapping.subject)
        if not subject:
            raise InvalidToken(f"token has no subject claim `{mapping.subject}`")
        principal = Principal(
            kind=self._kind(claims),
            id=subject,
            tenant=_string(claims, mapping.tenant) or mapping.default_tenant,
            issuer=self._subject_issuer(claims),
            groups=self._groups(claims),
        )
        return Caller(principal, self._credential(claims, token_id, expires_at), actor_chain(claims))

    def _subject_issuer(self, claims: dict[str, Any]) -> str:
        sub_id = claims.get("sub_id") if self._subject_issuer_claim else None
        if isinstance(sub_id, dict) and sub_id.get("format") == "iss_sub" and isinstance(sub_id.get("iss"), str):
            return str(sub_id["iss"])
        return self.issuer

    def _kind(self, claims: dict[str, Any]) -> Kind:
        mapping = self.claims
        declared = _string(claims, mapping.kind)
        if declared is not None:
            if declared not in KINDS:
                raise InvalidToken(f"claim `{mapping.kind}` `{shown(declared)}` must be one of human, service, agent")
            return declared  # type: ignore[return-value]
        for rule in mapping.kind_rules:
            value = claims.get(rule.claim)
            if value is not None and (rule.equals is None or value == rule.equals):
                return rule.kind
        return mapping.default_kind

    def _groups(self, claims: dict[str, Any]) -> tuple[str, ...]:
        name = self.claims.groups
        value = claims.get(name) if name else None
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(value.split())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise InvalidToken(f"claim `{name}` must be a list of strings")


class SpiffeIssuer(TokenIssuer):
    credential_kind = "jwt-svid"

    def __init__(self, config: SpiffeIssuerConfig, keys: KeySet, audiences: tuple[str, ...]) -> None:
        super().__init__(config.name, keys, config.algorithms, config.audiences or audiences)
        self.trust_domain = config.trust_domain
        self.config = config

    def caller(self, claims: dict[str, Any], token_id: str, expires_at: float) -> Caller:
        try:
            spiffe_id = parse_spiffe_id(str(claims.get("sub", "")))
        except ValueError as exc:
            raise InvalidToken(f"JWT-SVID `sub` is not a SPIFFE ID: {exc}") from None
        if spiffe_id.trust_domain != self.trust_domain:
            raise InvalidToken(f"SPIFFE ID `{shown(spiffe_id)}` is not in trust domain `{self.trust_domain}`")
        kind: Kind = self.config.default_kind
        tenant = self.config.tenant
        for rule in self.config.rules:
            if _under(spiffe_id.path, rule.path_prefix):
                kind, tenant = rule.kind, rule.tenant or tenant
                break
        principal = Principal(kind, str(spiffe_id), tenant, f"spiffe://{self.trust_domain}")
        return Caller(principal, self._credential(claims, token_id, expires_at), actor_chain(claims))


def _under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it, by whole segments: `/agents` covers `/agents/a1`, not `/agentsmith`."""
    base = prefix.rstrip("/")
    return path == base or path.startswith(base + "/")
