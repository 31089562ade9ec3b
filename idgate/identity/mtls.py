"""Client certificates: X.509-SVIDs as identities, and tokens bound to a certificate (RFC 8705).

Where the certificate comes from:

- **idgate terminates TLS** (`server.tls`): the handshake verified the chain
  against every trust source at once, and `idgate.serve` hands it to the app in
  the ASGI TLS extension (`scope["extensions"]["tls"]["client_cert_chain"]`);
- **a TLS-terminating proxy in front** (`server.trusted_proxies`): the proxy
  forwards the client's certificate in a header. The header is read only when
  the connection comes from a listed proxy address (and, if
  `proxy_identities` is set, only when that proxy presented one of those
  certificates itself); from anyone else it is ignored — a client cannot name
  its own certificate (DESIGN.md invariant 2). The proxy's own certificate is
  never taken for the client's.

What is checked here, on top of the chain (TLS cannot make these checks):

1. the chain verifies against *one* trust source, found again here (for a
   forwarded certificate, this is the only verification idgate makes);
2. the leaf is not a CA (`basicConstraints CA=true` is refused), and is meant
   for client authentication (an `extendedKeyUsage` without `clientAuth` is refused);
3. from a SPIFFE trust domain's bundle, the leaf is an X.509-SVID: exactly one
   URI SAN, a valid SPIFFE ID with a path, **in the trust domain whose bundle
   verified it** (one domain's authority cannot vouch for another domain's
   workloads), `digitalSignature` in its key usage.

A certificate from a CA file (`server.tls.client_ca_files`) identifies no one
here; a token can be bound to it. Results are cached per chain (bounded; a
success until the certificate expires, a refusal for a minute).

What it gives the rest of the gateway:

- `peer_certificate(request) -> PeerCertificate | None` (the token service binds
  tokens with it: `cnf: {"x5t#S256": peer.thumbprint}`);
- `ClientCertificates.caller(request)`: the identity source used by the `Gate`
  when a request has no `Authorization` header: an X.509-SVID becomes a
  `Caller` whose subject is the SPIFFE ID, mapped to kind and tenant by the
  trust domain's `spiffe[]` rules exactly as a JWT-SVID is; credential kind
  `x509-svid`, binding `mtls`;
- `ClientCertificates.check_binding`: the `CredentialCheck` that refuses a token
  with `cnf.x5t#S256` unless the connection's certificate has that thumbprint.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from idgate.errors import InvalidToken, MissingCredential, shown
from idgate.identity.issuers import SpiffeIssuer
from idgate.identity.principal import Caller, Credential
from idgate.identity.spiffe import SpiffeId, parse_spiffe_id
from idgate.proxy.http import Request
from idgate.tls import TrustedProxies, TrustSource, trust_sources

if TYPE_CHECKING:
    from idgate.config import Config

__all__ = ["SCOPE_KEY", "ClientCertificates", "PeerCertificate", "peer_certificate", "thumbprint"]

# Where the app puts its `ClientCertificates` in each request's scope, for `peer_certificate(request)`.
SCOPE_KEY = "idgate.client_certificates"

MAX_FORWARDED_BYTES = 64 * 1024
MAX_CHAIN = 10
REFUSAL_CACHE_SECONDS = 60.0


def thumbprint(der: bytes) -> str:
    """RFC 8705 `x5t#S256`: the base64url SHA-256 of the certificate's DER, unpadded."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """A client certificate that passed every check."""

    thumbprint: str  # RFC 8705 `x5t#S256` of the leaf
    spiffe_id: SpiffeId | None  # set for an X.509-SVID from a trusted SPIFFE trust domain
    certificate: x509.Certificate  # the leaf, parsed
    trust: str  # the trust source that issued it: `spiffe://DOMAIN` or a CA file
    expires_at: float  # the leaf's notAfter, as a Unix time
    forwarded: bool = False  # it came in a trusted proxy's header, not in idgate's own TLS handshake


@dataclass(frozen=True, slots=True)
class _Refused:
    message: str


@dataclass(frozen=True, slots=True)
class _Cached:
    result: PeerCertificate | _Refused
    until: float


def _ca_basic_constraints(policy: Any, certificate: x509.Certificate, extension: Any) -> None:
    if not isinstance(extension, x509.BasicConstraints) or not extension.ca:
        raise ValueError("an issuing certificate must have basicConstraints CA=true")


def _ca_key_usage(policy: Any, certificate: x509.Certificate, extension: Any) -> None:
    if isinstance(extension, x509.KeyUsage) and not extension.key_cert_sign:
        raise ValueError("an issuing certificate's key usage must include keyCertSign")


# What OpenSSL asks of issuing certificates, no more: a stricter profile here would refuse
# certificates the handshake accepted. The leaf's extensions are checked by `_check_leaf`.
_CA_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _ca_basic_constraints)
    .may_be_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _ca_key_usage)
)
_LEAF_POLICY = verification.ExtensionPolicy.permit_all()


def _uri_sans(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


class ClientCertificates:
    """Finds a request's client certificate (own TLS, or a trusted proxy's header) and checks it."""

    def __init__(
        self,
        sources: Sequence[TrustSource],
        spiffe_issuers: Sequence[SpiffeIssuer] = (),
        proxies: TrustedProxies | None = None,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 1024,
    ) -> None:
        self._sources = tuple(sources)
        self._stores = {s.name: verification.Store(list(s.authorities)) for s in self._sources}
        self._issuers = {i.trust_domain: i for i in spiffe_issuers}
        self._proxies = proxies or TrustedProxies()
        self._proxy_networks = tuple(self._proxies.addresses)
        self._proxy_header = self._proxies.client_cert_header.encode()
        self._clock = clock
        self._cache: dict[tuple[str | bytes, ...], _Cached] = {}
        self._cache_size = cache_size

    @classmethod
    def from_config(cls, config: Config, spiffe_issuers: Sequence[SpiffeIssuer]) -> ClientCertificates:
        return cls(trust_sources(config), spiffe_issuers, config.server.trusted_proxies)

    # -- which certificate a request comes with ---------------------------------------------------

    def peer_certificate(self, request: Request) -> PeerCertificate | None:
        """The client's verified certificate; None if it presented none; `InvalidToken` if it is refused."""
        if self._from_trusted_proxy(request):
            text = self._forwarded_text(request)
            if text is None:
                return None  # the proxy's own certificate is never taken for the client's
            self._check_proxy(request)
            return self._validated(("forwarded", text), lambda: self._parse_forwarded(text), True)
        return self._from_tls(request)

    def _from_tls(self, request: Request) -> PeerCertificate | None:
        """The certificate of idgate's own TLS handshake, from the ASGI TLS extension."""
        tls = (request.scope.get("extensions") or {}).get("tls")
        pems = tls.get("client_cert_chain") if isinstance(tls, dict) else None
        if not pems:
            return None
        # Keyed by the PEM strings themselves: the same objects on every request of a connection, hashed once.
        return self._validated(("tls", *pems), lambda: _der_chain(pems), False)

    def _from_trusted_proxy(self, request: Request) -> bool:
        if not self._proxy_networks:
            return False
        client = request.scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        return any(address in network for network in self._proxy_networks)

    def _check_proxy(self, request: Request) -> None:
        """A proxy that must authenticate itself did so, with one of the listed certificates."""
        identities = self._proxies.proxy_identities
        if not identities:
            return
        proxy = self._from_tls(request)
        names = () if proxy is None else (proxy.thumbprint, *([str(proxy.spiffe_id)] if proxy.spiffe_id else []))
        if not set(names) & set(identities):
            raise InvalidToken(
                "request from a trusted proxy address without the proxy's own client certificate "
                "(`server.trusted_proxies.proxy_identities`); its forwarded certificate is not believed"
            )

    def _forwarded_text(self, request: Request) -> str | None:
        """The URL-encoded PEM the proxy forwarded, or None when it forwarded no certificate."""
        values = [v for k, v in request.scope["headers"] if k.lower() == self._proxy_header]
        if not values:
            return None
        if len(values) > 1:
            raise InvalidToken(f"`{self._proxies.client_cert_header}` appears more than once; the proxy sets it once")
        raw = values[0]
        if len(raw) > MAX_FORWARDED_BYTES:
            raise InvalidToken(f"`{self._proxies.client_cert_header}` is over {MAX_FORWARDED_BYTES} bytes")
        text: str | None = raw.decode("latin-1").strip()
        if self._proxies.header_format == "xfcc" and text is not None:
            text = _xfcc_certificate(text)
        return text or None

    def _parse_forwarded(self, text: str) -> list[bytes]:
        try:
            certificates = x509.load_pem_x509_certificates(unquote(text).encode("latin-1"))
        except (ValueError, UnicodeEncodeError):
            raise InvalidToken(
                f"`{self._proxies.client_cert_header}` does not hold a URL-encoded PEM certificate"
            ) from None
        return [c.public_bytes(Encoding.DER) for c in certificates]

    # -- what a certificate is worth --------------------------------------------------------------

    def validate(self, chain: Sequence[bytes], *, forwarded: bool = False) -> PeerCertificate:
        """Check a chain (DER, leaf first); the result is cached per chain."""
        return self._validated(("der", *chain), lambda: chain, forwarded)

    def _validated(
        self, key: tuple[str | bytes, ...], load: Callable[[], Sequence[bytes]], forwarded: bool
    ) -> PeerCertificate:
        """The cached result for a chain in some form (`load` parses it to DER when not cached)."""
        now = self._clock()
        hit = self._cache.get(key)
        if hit is None or now >= hit.until:
            hit = self._check(load, now)
            self._remember(key, hit, now)
        if isinstance(hit.result, _Refused):
            raise InvalidToken(hit.result.message)
        if now >= hit.result.expires_at:
            raise InvalidToken("client certificate has expired")
        return dataclasses.replace(hit.result, forwarded=forwarded) if forwarded else hit.result

    def _remember(self, key: tuple[str | bytes, ...], entry: _Cached, now: float) -> None:
        if len(self._cache) >= self._cache_size:
            for old in [k for k, v in self._cache.items() if now >= v.until]:
                del self._cache[old]
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = entry

    def _check(self, load: Callable[[], Sequence[bytes]], now: float) -> _Cached:
        try:
            chain = load()
            if not chain or len(chain) > MAX_CHAIN:
                raise InvalidToken(f"client certificate chain is empty or longer than {MAX_CHAIN}")
            result = self._verify(chain, now)
        except InvalidToken as refusal:
            return _Cached(_Refused(refusal.message), now + REFUSAL_CACHE_SECONDS)
        return _Cached(result, result.expires_at)

    def _verify(self, chain: Sequence[bytes], now: float) -> PeerCertificate:
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
            intermediates = [x509.load_der_x509_certificate(der) for der in chain[1:]]
        except ValueError:
            raise InvalidToken("client certificate cannot be parsed") from None
        _check_leaf(leaf)
        uris = _uri_sans(leaf)
        source = self._issuing_source(leaf, intermediates, uris, now)
        spiffe_id = _svid_id(leaf, uris, source) if source.trust_domain is not None else None
        return PeerCertificate(
            thumbprint=thumbprint(chain[0]),
            spiffe_id=spiffe_id,
            certificate=leaf,
            trust=source.name,
            expires_at=leaf.not_valid_after_utc.timestamp(),
        )

    def _issuing_source(
        self, leaf: x509.Certificate, intermediates: list[x509.Certificate], uris: list[str], now: float
    ) -> TrustSource:
        """The trust source whose authorities verify the chain; the domain the SPIFFE ID names is tried first."""
        claimed = next((u[len("spiffe://") :].split("/", 1)[0] for u in uris if u.startswith("spiffe://")), None)
        ordered = sorted(self._sources, key=lambda s: (s.trust_domain is None, s.trust_domain != claimed))
        moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
        for source in ordered:
            verifier = (
                verification.PolicyBuilder()
                .store(self._stores[source.name])
                .time(moment)
                .max_chain_depth(MAX_CHAIN)
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
                .build_client_verifier()
            )
            try:
                verifier.verify(leaf, intermediates)
            except (verification.VerificationError, ValueError):
                continue
            return source
        raise InvalidToken(
            "client certificate is not issued by a trusted CA or SPIFFE trust bundle, or is not valid now"
        )

    # -- identity and binding ---------------------------------------------------------------------

    async def caller(self, request: Request) -> Caller:
        """The identity of a request without `Authorization`: its X.509-SVID, if it has one."""
        peer = self.peer_certificate(request)
        if peer is None:
            raise MissingCredential("no bearer token; send `Authorization: Bearer TOKEN` or an X.509-SVID")
        if peer.spiffe_id is None:
            raise MissingCredential(
                "the client certificate is not an X.509-SVID, so it names no one; send `Authorization: Bearer TOKEN`"
            )
        issuer = self._issuers.get(peer.spiffe_id.trust_domain)
        if issuer is None:  # pragma: no cover - every SPIFFE trust source comes from a `spiffe[]` entry
            raise InvalidToken(f"SPIFFE trust domain `{peer.spiffe_id.trust_domain}` is not configured")
        # The JWT-SVID path's mapping (rules, kind, tenant), for the same SPIFFE ID.
        mapped = issuer.caller({"sub": str(peer.spiffe_id)}, "x5t#S256:" + peer.thumbprint, peer.expires_at)
        credential = Credential(
            kind="x509-svid",
            id="x5t#S256:" + peer.thumbprint,
            issuer_name=issuer.name,
            expires_at=peer.expires_at,
            binding="mtls",
            x5t=peer.thumbprint,
        )
        return Caller(mapped.subject, credential)

    async def check_binding(self, caller: Caller, request: Request) -> None:
        """RFC 8705: a token with `cnf.x5t#S256` is used only over a connection with that certificate."""
        expected = caller.credential.x5t
        if expected is None:
            return
        try:
            peer = self.peer_certificate(request)
        except InvalidToken as refusal:
            raise InvalidToken(
                f"token is bound to a client certificate; this one is refused: {refusal.message}"
            ) from None
        if peer is None:
            raise InvalidToken("token is bound to a client certificate (`cnf.x5t#S256`); the request presented none")
        if peer.thumbprint != expected:
            raise InvalidToken("token is bound to another client certificate than the one presented")


def peer_certificate(request: Request) -> PeerCertificate | None:
    """The request's verified client certificate (None if none); `InvalidToken` if one was presented and refused.

    Uses the app's `ClientCertificates`, which the app puts in the scope (`SCOPE_KEY`).
    """
    certificates = request.scope.get(SCOPE_KEY)
    if not isinstance(certificates, ClientCertificates):
        return None
    return certificates.peer_certificate(request)


def _der_chain(pems: Sequence[str]) -> list[bytes]:
    try:
        return [ssl.PEM_cert_to_DER_cert(pem) for pem in pems]
    except ValueError:
        raise InvalidToken("client certificate cannot be parsed") from None


def _check_leaf(leaf: x509.Certificate) -> None:
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise InvalidToken("client certificate is a CA certificate (basicConstraints CA=true); present a leaf")
    usages = _extension(leaf, x509.ExtendedKeyUsage)
    if usages is not None and not {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(
        usages
    ):
        raise InvalidToken("client certificate is not for client authentication (extendedKeyUsage lacks clientAuth)")


def _svid_id(leaf: x509.Certificate, uris: list[str], source: TrustSource) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID, by the X.509-SVID specification."""
    if len(uris) != 1:
        raise InvalidToken(f"an X.509-SVID has exactly one URI SAN; this certificate has {len(uris)}")
    try:
        spiffe_id = parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise InvalidToken(f"X.509-SVID URI SAN `{shown(uris[0])}` is not a SPIFFE ID: {exc}") from None
    if not spiffe_id.path:
        raise InvalidToken("an X.509-SVID's SPIFFE ID names a workload: a path after the trust domain")
    if spiffe_id.trust_domain != source.trust_domain:
        raise InvalidToken(
            f"SPIFFE ID `{shown(spiffe_id)}` is not in trust domain `{source.trust_domain}`, "
            "whose authority issued the certificate"
        )
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise InvalidToken("an X.509-SVID's key usage must include digitalSignature")
    return spiffe_id


def _xfcc_certificate(value: str) -> str | None:
    """The `Chain` (else `Cert`) field of an Envoy x-forwarded-client-cert header of one element."""
    elements = _split(value, ",")
    if len(elements) != 1:
        raise InvalidToken(f"x-forwarded-client-cert holds {len(elements)} elements; the trusted proxy sets one")
    fields: dict[str, str] = {}
    for pair in _split(elements[0], ";"):
        name, _, raw = pair.partition("=")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].replace('\\"', '"')
        fields[name.strip().lower()] = raw
    return fields.get("chain") or fields.get("cert")


def _split(value: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]
