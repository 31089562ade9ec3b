"""TLS served by idgate itself, and the certificate authorities clients are checked against.

idgate can terminate TLS (`server.tls`) and ask callers for a client
certificate. The certificates a client may present chain to one of two kinds of
*trust source*:

- a **SPIFFE trust domain** (`spiffe[].x509_bundle_file`): its X.509 authorities
  issue X.509-SVIDs, whose one URI SAN is a SPIFFE ID *of that domain*; such a
  certificate is an identity (see `idgate.identity.mtls`);
- a **CA file** (`server.tls.client_ca_files`): any PKI; its certificates carry
  no identity of their own here, but tokens can be bound to them (RFC 8705).

The TLS handshake (OpenSSL) checks the chain against all sources at once; which
source issued a certificate, and the checks TLS cannot make, are the business of
`idgate.identity.mtls`. Behind a TLS-terminating proxy, the client's certificate
arrives in a header, honoured only from `server.trusted_proxies` (DESIGN.md
invariant 2).

This module holds the settings (only pydantic, the standard library and
`cryptography` are imported: `idgate.config` imports it), the loading of bundle
files, and the server's `ssl.SSLContext`. Serving it is `idgate.serve`.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork

from idgate.errors import ConfigError

if TYPE_CHECKING:
    from idgate.config import Config

__all__ = [
    "ServerTls",
    "TlsSettings",
    "TrustSource",
    "TrustedProxies",
    "load_authorities",
    "server_tls",
    "tls_problems",
    "trust_sources",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(_Frozen):
    """`server.tls`: idgate terminates TLS, and may ask for client certificates."""

    certificate: Path = Field(description="PEM file: the server's certificate, then any intermediates")
    key: Path = Field(description="PEM file: the server's private key (unencrypted; keep it readable only by idgate)")
    client_ca_files: tuple[Path, ...] = Field(
        (), description="PEM files of CAs whose client certificates are accepted (for binding tokens, RFC 8705)"
    )
    client_certificates: Literal["optional", "required"] = Field(
        "optional",
        description="with client CAs or SPIFFE X.509 bundles: may a client connect without a certificate",
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="lowest TLS version accepted")


class TrustedProxies(_Frozen):
    """`server.trusted_proxies`: TLS-terminating proxies whose forwarded client certificate is believed."""

    addresses: tuple[IPvAnyNetwork, ...] = Field(
        (), description="addresses or CIDRs of the proxies; from anyone else the header is ignored"
    )
    client_cert_header: str = Field(
        "x-forwarded-client-cert",
        pattern=r"^[a-z0-9-]+$",
        description="the request header carrying the client's certificate (lowercase)",
    )
    header_format: Literal["pem", "xfcc"] = Field(
        "pem",
        description="`pem`: URL-encoded PEM, leaf first (nginx `$ssl_client_escaped_cert`); "
        "`xfcc`: Envoy's x-forwarded-client-cert, its `Chain` or `Cert` field",
    )
    proxy_identities: tuple[str, ...] = Field(
        (),
        description="if set, the proxy must itself connect over TLS with a client certificate whose SPIFFE ID "
        "or `x5t#S256` thumbprint is listed here",
    )


@dataclass(frozen=True, slots=True)
class TrustSource:
    """Authorities that issue client certificates: a SPIFFE trust domain's bundle, or a CA file."""

    name: str  # `spiffe://DOMAIN` or the CA file's path, for messages and records
    trust_domain: str | None  # set for a SPIFFE trust domain: its certificates are X.509-SVIDs
    authorities: tuple[x509.Certificate, ...]


def load_authorities(path: Path) -> tuple[x509.Certificate, ...]:
    """CA certificates from a PEM file, or from a SPIFFE trust bundle (JSON: keys with `use: x509-svid`, `x5c`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"CA bundle `{path}` cannot be read: {exc.strerror}"]) from None
    try:
        if data.lstrip().startswith(b"{"):
            certificates = _spiffe_bundle(orjson.loads(data))
        else:
            certificates = x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError([f"CA bundle `{path}` is not PEM certificates or a SPIFFE bundle: {exc}"]) from None
    if not certificates:
        raise ConfigError([f"CA bundle `{path}` holds no X.509 authorities"])
    return tuple(certificates)


def _spiffe_bundle(document: Any) -> list[x509.Certificate]:
    """The X.509 authorities of a SPIFFE bundle: each `use: x509-svid` key's single `x5c` certificate."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a SPIFFE bundle is a JSON object with `keys`")
    certificates = []
    for key in document["keys"]:
        if isinstance(key, dict) and key.get("use") == "x509-svid":
            chain = key.get("x5c")
            if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
                raise ValueError("an `x509-svid` key must have exactly one `x5c` certificate")
            certificates.append(x509.load_der_x509_certificate(base64.b64decode(chain[0])))
    return certificates


def trust_sources(config: Config) -> tuple[TrustSource, ...]:
    """Every source of client certificates: the SPIFFE domains with X.509 bundles, then the CA files."""
    sources = [
        TrustSource(f"spiffe://{d.trust_domain}", d.trust_domain, load_authorities(d.x509_bundle_file))
        for d in config.spiffe
        if d.x509_bundle_file is not None
    ]
    tls = config.server.tls
    if tls is not None:
        sources += [TrustSource(str(path), None, load_authorities(path)) for path in tls.client_ca_files]
    return tuple(sources)


def tls_problems(config: Config) -> list[str]:
    """What makes a config's TLS settings unservable, by key path (checked with the rest of the config)."""
    problems = []
    tls = config.server.tls
    has_sources = bool(tls and tls.client_ca_files) or any(d.x509_bundle_file for d in config.spiffe)
    if tls is not None and tls.client_certificates == "required" and not has_sources:
        problems.append(
            "server.tls.client_certificates: `required` needs `server.tls.client_ca_files` "
            "or a `spiffe[].x509_bundle_file`"
        )
    if config.server.trusted_proxies.proxy_identities and tls is None:
        problems.append(
            "server.trusted_proxies.proxy_identities: proxies can present a certificate only when "
            "idgate serves TLS (`server.tls`)"
        )
    return problems


@dataclass(frozen=True, slots=True)
class ServerTls:
    """What the server side of TLS needs, as plain values (picklable: each worker builds its own context)."""

    certificate: Path
    key: Path
    min_version: Literal["1.2", "1.3"]
    client_certificates: Literal["none", "optional", "required"]
    client_authorities_pem: str  # every trust source's authorities, PEM

    def context(self) -> ssl.SSLContext:
        """idgate's certificate, and the client CAs when any are configured."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3 if self.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.certificate, self.key)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise ConfigError(
                [f"server.tls: certificate `{self.certificate}` and key `{self.key}` cannot be used: {reason}"]
            ) from None
        context.set_alpn_protocols(["http/1.1"])
        # No resumed sessions: a resumed TLS session carries no client chain, and the gateway
        # checks each connection's chain itself (which trust source issued it).
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
        if self.client_certificates != "none":
            context.load_verify_locations(cadata=self.client_authorities_pem)
            context.verify_mode = ssl.CERT_REQUIRED if self.client_certificates == "required" else ssl.CERT_OPTIONAL
        return context


def server_tls(config: Config) -> ServerTls:
    """The server side of `server.tls`, with the client authorities of every trust source loaded now."""
    tls = config.server.tls
    if tls is None:
        raise ConfigError(["server.tls: not configured"])
    sources = trust_sources(config)
    pem = "".join(c.public_bytes(Encoding.PEM).decode() for s in sources for c in s.authorities)
    return ServerTls(tls.certificate, tls.key, tls.min_version, tls.client_certificates if pem else "none", pem)
