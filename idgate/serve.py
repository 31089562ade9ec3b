"""Serving idgate with uvicorn, and handing the TLS peer's certificate to the app.

uvicorn terminates TLS but tells the app nothing about the client's certificate.
`TlsHttpToolsProtocol` is uvicorn's httptools protocol plus the ASGI TLS
extension (https://asgi.readthedocs.io/en/latest/specs/tls.html): once per
connection, after the handshake, it reads the peer's certificate chain from the
`ssl` object and puts it into every request's `scope["extensions"]["tls"]`::

    {"server_cert": PEM | None, "client_cert_chain": [PEM, ...], "client_cert_name": "CN=..." | None,
     "client_cert_error": None, "tls_version": 0x0304, "cipher_suite": 0x1302}

`client_cert_chain` is the chain OpenSSL verified, leaf first (the trust anchor
last); when a resumed session has none, the chain the client sent, or its leaf.
A certificate that failed verification never gets this far: the handshake
fails. The app decides what the certificate means (`idgate.identity.mtls`).

`uvicorn_options(config)` is what `idgate serve` adds for `server.tls`; it is
picklable, so `--workers N` builds the same `SSLContext` in every worker.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import TYPE_CHECKING, Any

from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from idgate.tls import ServerTls, server_tls

if TYPE_CHECKING:
    from idgate.config import Config

__all__ = ["PROTOCOL", "TlsHttpToolsProtocol", "tls_extension", "uvicorn_options"]

PROTOCOL = "idgate.serve:TlsHttpToolsProtocol"

_TLS_VERSIONS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303, "TLSv1.1": 0x0302, "TLSv1": 0x0301}


def _chain_der(ssl_object: Any) -> list[bytes]:
    """The peer's chain as DER, leaf first: verified if OpenSSL kept it, else as sent, else the leaf alone.

    `get_verified_chain` is public on `SSLObject` from Python 3.13; before, it is on
    the `_ssl` object underneath (since 3.10).
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        return []
    for owner in (ssl_object, getattr(ssl_object, "_sslobj", None)):
        for name in ("get_verified_chain", "get_unverified_chain"):
            method = getattr(owner, name, None)
            chain = [c for c in (method() or ()) if c is not None] if method is not None else []
            if chain:
                ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
                if ders[0] == leaf:
                    return ders
    return [leaf]


@functools.cache
def _cipher_ids() -> dict[str, int]:
    """OpenSSL cipher names to their 16-bit TLS ids (what the ASGI TLS extension reports)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL")
    return {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, or None when it is not TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        chain = _chain_der(ssl_object)
    except (ssl.SSLError, ValueError, AttributeError, TypeError):
        # Never fail open: the request then has no client certificate (no identity, no binding).
        chain = []
    name = None
    if chain:
        try:
            name = x509.load_der_x509_certificate(chain[0]).subject.rfc4514_string()
        except ValueError:
            name = None
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,  # optional in the spec; nothing here needs it
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der) for der in chain],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_ids().get(cipher[0]) if cipher else None,
    }


class TlsHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that fills in the ASGI TLS extension of each request's scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls_extension(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            # Computed once per connection; each request gets its own copy, so no request can alter another's.
            tls = dict(self._tls, client_cert_chain=list(self._tls["client_cert_chain"]))
            self.scope["extensions"] = {"tls": tls}  # type: ignore[dict-item]


def _ssl_context(tls: ServerTls, uvicorn_config: Any, default: Any) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory` (called in each worker): idgate's own context."""
    return tls.context()


def uvicorn_options(config: Config) -> dict[str, Any]:
    """The uvicorn settings `server.tls` needs (none without it): the protocol and the `SSLContext`."""
    if config.server.tls is None:
        return {}
    tls = server_tls(config)
    tls.context()  # fail now, in the config's words, rather than in every worker
    return {"http": PROTOCOL, "ssl_context_factory": functools.partial(_ssl_context, tls)}
