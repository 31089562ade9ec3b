"""mTLS: idgate terminates TLS, an X.509-SVID is an identity, a token can be bound to a certificate.

Real parts: certificates minted here with `cryptography` (a CA per SPIFFE trust
domain, X.509-SVID leaves with one URI SAN and no DNS SAN, checked with the
`spiffe` package's own parser), idgate under uvicorn with its own TLS protocol
(and once as `idgate serve --workers 2`), and clients that speak real TLS with a
client certificate: the standard library's `http.client` and the official
`openai` SDK. Like any SPIFFE client, they verify the server's X.509-SVID
against the trust bundle with hostname checks off, and check its SPIFFE ID
themselves.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
import orjson
import pytest
import uvicorn
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe.errors import ArgumentError
from spiffe.svid.errors import InvalidLeafCertificateError
from spiffe.svid.x509_svid import X509Svid
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from idgate.app import build_app
from idgate.config import parse_config
from idgate.errors import ConfigError
from idgate.identity.mtls import ClientCertificates, thumbprint
from idgate.serve import TlsHttpToolsProtocol, uvicorn_options
from idgate.tls import TrustedProxies, TrustSource, load_authorities
from tests.conftest import UPSTREAM_KEY, base_config
from tests.support import Gateway, TestIssuer, Upstream, free_port, wait_for

CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
PERMIT_ALL = str(Path(__file__).parent / "data" / "permit_all.cedar")
SERVER_ID = "spiffe://example.org/idgate"
NOW = datetime.datetime.now(datetime.UTC)


# -- a small PKI -------------------------------------------------------------------------


@dataclass
class Identity:
    """A certificate and its key, on disk as PEM (the chain file holds the leaf, then intermediates)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path
    key_file: Path
    chain: list[x509.Certificate] = field(default_factory=list)  # intermediates to send after it, not the root
    root: bool = False

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.certificate, *self.chain])


class Pki:
    """Mints CAs and leaves into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def _save(
        self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, issuer: Identity | None
    ) -> Identity:
        self.count += 1
        cert_file, key_file = self.folder / f"cert{self.count}.pem", self.folder / f"key{self.count}.pem"
        chain = [] if issuer is None or issuer.root else [issuer.certificate, *issuer.chain]
        identity = Identity(certificate, key, cert_file, key_file, chain, root=issuer is None)
        cert_file.write_bytes(identity.pem)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return identity

    def ca(self, trust_domain: str, issuer: Identity | None = None) -> Identity:
        """A CA of a trust domain (a root, or an intermediate under `issuer`), as SPIRE makes them."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"intermediate {self.count}" if issuer else "root"),
            ]
        )
        builder = (
            _base(name, issuer.certificate.subject if issuer else name, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
        )
        signer = issuer.key if issuer else key
        return self._save(builder.sign(signer, hashes.SHA256()), key, issuer)

    def leaf(
        self,
        issuer: Identity,
        uris: list[str],
        *,
        ca: bool = False,
        server: bool = False,
        client_auth: bool = True,
        subject: str = "workload",
    ) -> Identity:
        """An X.509-SVID-shaped leaf: URI SANs only, no DNS SAN; `ca=True` makes the forbidden CA-as-leaf."""
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else []
        usages += [ExtendedKeyUsageOID.SERVER_AUTH] if server or not client_auth else []
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            _base(name, issuer.certificate.subject, key)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=ca), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        )
        if uris:
            sans = [x509.UniformResourceIdentifier(u) for u in uris]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._save(builder.sign(issuer.key, hashes.SHA256()), key, issuer)


def _base(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(hours=2))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# -- servers and clients -------------------------------------------------------------------


class ServerThread:
    """An ASGI app under uvicorn, in a thread, with idgate's TLS serving options for `config`."""

    def __init__(self, app: Any, port: int, options: dict[str, Any]) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, lifespan="on", access_log=False, log_level="warning", **options
            )
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 10)
        if not self.server.started:
            raise RuntimeError("server did not start")

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):
            self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class TlsGateway(Gateway):
    """idgate with `server.tls`, served the way `idgate serve` serves it (same protocol, same SSL context)."""

    def __init__(self, config: dict[str, Any], home: Path) -> None:  # Gateway's set-up, plus TLS
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        server = {"port": self.port, "audiences": ["idgate-test"], **config.get("server", {})}
        env = {"IDGATE_HOME": str(home), "TEST_UPSTREAM_KEY": UPSTREAM_KEY}
        self.config = parse_config({**config, "server": server}, env)
        self.app = build_app(self.config)
        self._runner = ServerThread(self.app, self.port, uvicorn_options(self.config))
        self.server = self._runner.server

    def stop(self) -> None:
        self._runner.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.json()["error"]
        return error


def client_context(bundle: Path, identity: Identity | None) -> ssl.SSLContext:
    """A SPIFFE-style TLS client: the server's SVID is verified against the bundle, without hostname checks."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # an X.509-SVID has no DNS SAN; the SPIFFE ID is checked after connecting
    context.load_verify_locations(cafile=bundle)
    if identity is not None:
        context.load_cert_chain(identity.cert_file, identity.key_file)
    return context


def server_spiffe_ids(sock: ssl.SSLSocket) -> list[str]:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def call(
    port: int,
    bundle: Path,
    identity: Identity | None,
    *,
    method: str = "GET",
    path: str = "/v1/models",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    tls: bool = True,
    requests: int = 1,
) -> Answer:
    """HTTP/1.1 over TLS with `identity` as the client certificate (or plain HTTP, `tls=False`); the last answer."""
    connection: http.client.HTTPConnection
    if tls:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, context=client_context(bundle, identity), timeout=10
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.connect()
        if tls:
            assert isinstance(connection.sock, ssl.SSLSocket)
            assert server_spiffe_ids(connection.sock) == [SERVER_ID]  # the client checks whom it reached
        for _ in range(requests):  # several requests on one connection: keep-alive keeps the certificate
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        return answer
    finally:
        connection.close()


def chat(
    port: int, bundle: Path, identity: Identity | None, headers: dict[str, str] | None = None, **kw: Any
) -> Answer:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return call(
        port,
        bundle,
        identity,
        method="POST",
        path="/v1/chat/completions",
        headers=headers,
        body=orjson.dumps(CHAT),
        **kw,
    )


def record_of(gateway: Gateway, answer: Answer) -> dict[str, Any]:
    return gateway.record(answer.headers["x-request-id"])


def assert_refused(answer: Answer, message: str, code: str = "invalid_token") -> None:
    assert answer.status == 401, answer.body
    assert answer.headers["www-authenticate"].startswith('Bearer realm="idgate"')
    assert answer.error["code"] == code
    assert message in answer.error["message"], answer.error["message"]


# -- fixtures -------------------------------------------------------------------------------


@dataclass
class World:
    """The PKI every test uses: trust domains, their bundles, and workloads."""

    pki: Pki
    example: Identity  # root CA of example.org (trusted, bundle as PEM)
    example_inter: Identity  # an intermediate CA of example.org
    partner: Identity  # root CA of partner.org (trusted, bundle as a SPIFFE JSON bundle)
    evil: Identity  # root CA of evil.org (not trusted)
    plain: Identity  # a plain CA in `server.tls.client_ca_files`
    server: Identity  # idgate's own X.509-SVID
    example_bundle: Path
    partner_bundle: Path
    plain_bundle: Path

    def svid(self, path: str, issuer: Identity | None = None, **kw: Any) -> Identity:
        return self.pki.leaf(issuer or self.example, [f"spiffe://example.org{path}"], **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("pki")
    pki = Pki(folder)
    example, partner, evil, plain = pki.ca("example.org"), pki.ca("partner.org"), pki.ca("evil.org"), pki.ca("plain")
    example_inter = pki.ca("example.org", issuer=example)
    server = pki.leaf(example, [SERVER_ID], server=True, subject="idgate")
    example_bundle, partner_bundle, plain_bundle = folder / "example.pem", folder / "partner.json", folder / "plain.pem"
    example_bundle.write_bytes(example.pem)
    plain_bundle.write_bytes(plain.pem)
    # A SPIFFE trust bundle document (JWKS): the X.509 authority as an `x509-svid` key with `x5c`.
    authority = {"kty": "EC", "use": "x509-svid", "x5c": [base64.b64encode(partner.der).decode()]}
    partner_bundle.write_bytes(orjson.dumps({"keys": [authority], "spiffe_sequence": 1}))
    return World(
        pki, example, example_inter, partner, evil, plain, server, example_bundle, partner_bundle, plain_bundle
    )


@pytest.fixture(scope="module")
def trusted() -> Iterator[TestIssuer]:
    server = TestIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


def tls_config(world: World, trusted: TestIssuer, upstream: Upstream, **server: Any) -> dict[str, Any]:
    config = base_config(trusted, upstream)
    tls = {"certificate": str(world.server.cert_file), "key": str(world.server.key_file)}
    config["server"] = {"tls": {**tls, "client_ca_files": [str(world.plain_bundle)]}, **server}
    config["spiffe"] = [
        {
            "name": "mesh",
            "trust_domain": "example.org",
            "x509_bundle_file": str(world.example_bundle),
            "tenant": "ops",
            "rules": [{"path_prefix": "/agents", "kind": "agent", "tenant": "acme"}],
        },
        {"name": "partner", "trust_domain": "partner.org", "x509_bundle_file": str(world.partner_bundle)},
    ]
    config["policy"] = {"files": [PERMIT_ALL]}  # identity is under test here, not policy
    return config


@pytest.fixture(scope="module")
def door(
    tmp_path_factory: pytest.TempPathFactory, world: World, trusted: TestIssuer, shared_upstream: Upstream
) -> Iterator[TlsGateway]:
    """idgate serving TLS with optional client certificates; no trusted proxies."""
    gateway = TlsGateway(tls_config(world, trusted, shared_upstream), tmp_path_factory.mktemp("door"))
    yield gateway
    gateway.stop()


# -- the test certificates are X.509-SVIDs by the spiffe package's own rules -----------------


def test_the_test_svids_are_valid_by_the_spiffe_package(world: World) -> None:
    def parse(identity: Identity) -> str:
        key = identity.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return str(X509Svid.parse(identity.pem, key).spiffe_id)

    assert parse(world.svid("/agents/a1")) == "spiffe://example.org/agents/a1"
    assert parse(world.svid("/ns/web", issuer=world.example_inter)) == "spiffe://example.org/ns/web"
    with pytest.raises((InvalidLeafCertificateError, ArgumentError)):
        parse(world.pki.leaf(world.example, ["spiffe://example.org/a", "spiffe://example.org/b"]))
    with pytest.raises((InvalidLeafCertificateError, ArgumentError)):
        parse(world.svid("/a", ca=True))


# -- an X.509-SVID is an identity ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "tenant", "intermediate"),
    [
        ("/agents/a1", "agent", "acme", False),
        ("/ns/prod/sa/web", "service", "ops", False),
        ("/ns/prod/sa/batch", "service", "ops", True),  # issued by an intermediate CA the client sends
    ],
)
def test_svid_from_the_trusted_bundle_is_identified_by_its_spiffe_id(
    door: TlsGateway, world: World, path: str, kind: str, tenant: str, intermediate: bool
) -> None:
    workload = world.svid(path, issuer=world.example_inter if intermediate else None)
    answer = chat(door.port, world.example_bundle, workload, requests=2)
    assert answer.status == 200, answer.body
    record = record_of(door, answer)
    assert record["subject"] == {
        "kind": kind,
        "id": f"spiffe://example.org{path}",
        "tenant": tenant,
        "issuer": "spiffe://example.org",
        "groups": [],
    }
    assert record["credential"]["kind"] == "x509-svid" and record["credential"]["issuer"] == "mesh"
    assert record["credential"]["binding"] == "mtls"


def test_svid_of_a_trusted_domain_with_a_spiffe_bundle_document(door: TlsGateway, world: World) -> None:
    workload = world.pki.leaf(world.partner, ["spiffe://partner.org/billing"])
    answer = call(door.port, world.example_bundle, workload)
    assert answer.status == 200, answer.body
    assert record_of(door, answer)["subject"]["id"] == "spiffe://partner.org/billing"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("two-uri-sans", "an X.509-SVID has exactly one URI SAN; this certificate has 2"),
        ("no-uri-san", "an X.509-SVID has exactly one URI SAN; this certificate has 0"),
        ("ca-as-leaf", "client certificate is a CA certificate (basicConstraints CA=true)"),
        ("other-domain-id", "SPIFFE ID `spiffe://partner.org/billing` is not in trust domain `example.org`"),
        ("cross-domain-issuer", "SPIFFE ID `spiffe://example.org/admin` is not in trust domain `partner.org`"),
        ("no-path", "an X.509-SVID's SPIFFE ID names a workload"),
        ("not-a-spiffe-id", "X.509-SVID URI SAN `https://example.org/a` is not a SPIFFE ID"),
    ],
)
def test_certificates_that_are_not_valid_svids_are_refused(
    door: TlsGateway, world: World, case: str, message: str
) -> None:
    pki = world.pki
    workload = {
        "two-uri-sans": lambda: pki.leaf(world.example, ["spiffe://example.org/a", "spiffe://example.org/b"]),
        "no-uri-san": lambda: pki.leaf(world.example, []),
        "ca-as-leaf": lambda: world.svid("/sneaky", ca=True),
        # example.org's CA signing an ID of partner.org, and partner.org's CA one of example.org:
        "other-domain-id": lambda: pki.leaf(world.example, ["spiffe://partner.org/billing"]),
        "cross-domain-issuer": lambda: pki.leaf(world.partner, ["spiffe://example.org/admin"]),
        "no-path": lambda: pki.leaf(world.example, ["spiffe://example.org"]),
        "not-a-spiffe-id": lambda: pki.leaf(world.example, ["https://example.org/a"]),
    }[case]()
    answer = chat(door.port, world.example_bundle, workload)
    assert_refused(answer, message)
    record = record_of(door, answer)
    assert record["subject"] is None and record["outcome"] == "refused"


@pytest.mark.parametrize("case", ["untrusted-domain", "server-only"])
def test_certificates_the_handshake_refuses(door: TlsGateway, world: World, case: str) -> None:
    """TLS itself refuses a chain to no trusted authority, and a certificate not meant for clients."""
    if case == "untrusted-domain":
        workload = world.pki.leaf(world.evil, ["spiffe://evil.org/agents/a1"])
    else:
        workload = world.svid("/web", client_auth=False)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        chat(door.port, world.example_bundle, workload)


def test_no_certificate_and_no_token_is_a_missing_credential(door: TlsGateway, world: World) -> None:
    answer = chat(door.port, world.example_bundle, None)
    assert_refused(answer, "no bearer token; send `Authorization: Bearer TOKEN` or an X.509-SVID", "missing_token")


def test_a_certificate_of_a_plain_ca_names_no_one(door: TlsGateway, world: World) -> None:
    client = world.pki.leaf(world.plain, [], subject="laptop-7")
    answer = chat(door.port, world.example_bundle, client)
    assert_refused(answer, "the client certificate is not an X.509-SVID, so it names no one", "missing_token")


def test_a_token_wins_over_the_certificate(door: TlsGateway, world: World, trusted: TestIssuer) -> None:
    """With `Authorization`, the token is the identity; the certificate only matters to a bound token."""
    answer = chat(
        door.port, world.example_bundle, world.svid("/agents/a1"), {"Authorization": f"Bearer {trusted.mint()}"}
    )
    assert answer.status == 200, answer.body
    assert record_of(door, answer)["subject"]["id"] == "alice"


# -- certificate-bound tokens (RFC 8705) -----------------------------------------------------


def test_a_certificate_bound_token_works_only_with_its_certificate(
    door: TlsGateway, world: World, trusted: TestIssuer
) -> None:
    holder, other = world.svid("/agents/holder"), world.pki.leaf(world.plain, [], subject="other")
    token = trusted.mint({"cnf": {"x5t#S256": thumbprint(holder.der)}})
    bearer = {"Authorization": f"Bearer {token}"}

    good = chat(door.port, world.example_bundle, holder, bearer)
    assert good.status == 200, good.body
    credential = record_of(door, good)["credential"]
    assert credential["binding"] == "mtls" and credential["kind"] == "jwt"

    assert_refused(chat(door.port, world.example_bundle, other, bearer), "token is bound to another client certificate")
    assert_refused(chat(door.port, world.example_bundle, None, bearer), "the request presented none")


def test_a_token_bound_by_a_plain_ca_certificate(door: TlsGateway, world: World, trusted: TestIssuer) -> None:
    laptop = world.pki.leaf(world.plain, [], subject="laptop-8")
    token = trusted.mint({"cnf": {"x5t#S256": thumbprint(laptop.der)}})
    answer = chat(door.port, world.example_bundle, laptop, {"Authorization": f"Bearer {token}"})
    assert answer.status == 200, answer.body


def test_openai_sdk_over_mtls(door: TlsGateway, world: World, trusted: TestIssuer) -> None:
    workload = world.svid("/agents/sdk")
    context = client_context(world.example_bundle, workload)
    token = trusted.mint({"cnf": {"x5t#S256": thumbprint(workload.der)}})
    # A cert-bound token, and the X.509-SVID alone (the SDK's `Authorization` header left out).
    for api_key, headers in ((token, {}), ("unused", {"Authorization": openai.Omit()})):
        with openai.OpenAI(
            base_url=f"{door.url}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=10,
            http_client=openai.DefaultHttpxClient(verify=context),
        ) as client:
            reply = client.chat.completions.with_raw_response.create(**CHAT, extra_headers=headers)
            assert reply.parse().choices[0].message.content == "upstream says hi"
            subject = door.record(reply.headers["x-request-id"])["subject"]
        assert subject["id"] == ("alice" if api_key == token else "spiffe://example.org/agents/sdk")


# -- behind a TLS-terminating proxy ------------------------------------------------------------


def forwarded(*identities: Identity) -> dict[str, str]:
    """The header a proxy like nginx sets (`$ssl_client_escaped_cert`): URL-encoded PEM, leaf first."""
    return {"X-Forwarded-Client-Cert": quote(b"".join(i.pem for i in identities).decode(), safe="")}


def test_a_forwarded_certificate_from_an_untrusted_peer_is_ignored(door: TlsGateway, world: World) -> None:
    alice = world.svid("/agents/alice")
    answer = chat(door.port, world.example_bundle, None, forwarded(alice))
    assert_refused(answer, "no bearer token", "missing_token")
    # With a certificate of its own, the caller is who that certificate says, whatever the header claims.
    bob = world.svid("/agents/bob")
    answer = chat(door.port, world.example_bundle, bob, forwarded(alice))
    assert answer.status == 200 and record_of(door, answer)["subject"]["id"] == "spiffe://example.org/agents/bob"


def proxy_config(world: World, trusted: TestIssuer, upstream: Upstream, addresses: list[str]) -> dict[str, Any]:
    """idgate behind a proxy, over plain HTTP on loopback: only the SPIFFE bundle, no TLS of its own."""
    config = tls_config(world, trusted, upstream)
    config["server"] = {"trusted_proxies": {"addresses": addresses}}
    return config


@pytest.fixture(scope="module")
def behind_proxy(
    tmp_path_factory: pytest.TempPathFactory, world: World, trusted: TestIssuer, shared_upstream: Upstream
) -> Iterator[Gateway]:
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    config = proxy_config(world, trusted, shared_upstream, ["127.0.0.1/32", "10.0.0.0/8"])
    gateway = Gateway(config, tmp_path_factory.mktemp("proxied"), env)
    yield gateway
    gateway.stop()


def test_a_forwarded_svid_from_a_trusted_proxy_is_the_identity(behind_proxy: Gateway, world: World) -> None:
    for workload in (world.svid("/agents/a9"), world.svid("/ns/web", issuer=world.example_inter)):
        answer = chat(behind_proxy.port, world.example_bundle, None, forwarded(workload), tls=False)
        assert answer.status == 200, answer.body
        record = record_of(behind_proxy, answer)
        spiffe_id = x509.load_der_x509_certificate(workload.der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        assert record["subject"]["id"] == spiffe_id.value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        assert record["credential"]["kind"] == "x509-svid"


def test_a_forwarded_certificate_is_checked_like_a_direct_one(
    behind_proxy: Gateway, world: World, trusted: TestIssuer
) -> None:
    pki = world.pki
    cases = [
        (forwarded(world.svid("/sneaky", ca=True)), "client certificate is a CA certificate"),
        (
            forwarded(pki.leaf(world.example, ["spiffe://example.org/a", "spiffe://example.org/b"])),
            "exactly one URI SAN",
        ),
        (forwarded(pki.leaf(world.evil, ["spiffe://evil.org/x"])), "not issued by a trusted CA or SPIFFE trust bundle"),
        (forwarded(pki.leaf(world.partner, ["spiffe://example.org/admin"])), "is not in trust domain `partner.org`"),
        (forwarded(world.svid("/web", client_auth=False)), "extendedKeyUsage lacks clientAuth"),
        ({"X-Forwarded-Client-Cert": "not%20a%20certificate"}, "does not hold a URL-encoded PEM certificate"),
    ]
    for headers, message in cases:
        assert_refused(chat(behind_proxy.port, world.example_bundle, None, headers, tls=False), message)
    # Sent twice (a proxy that appends instead of replacing): the first could be the client's own.
    twice = [("x-forwarded-client-cert", forwarded(world.svid("/a"))["X-Forwarded-Client-Cert"])] * 2
    connection = http.client.HTTPConnection("127.0.0.1", behind_proxy.port, timeout=10)
    try:
        connection.putrequest("GET", "/v1/models")
        for name, value in twice:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
    assert_refused(answer, "appears more than once")
    # A token bound to the forwarded certificate.
    holder = world.svid("/agents/holder")
    token = trusted.mint({"cnf": {"x5t#S256": thumbprint(holder.der)}})
    bearer = {"Authorization": f"Bearer {token}"}
    good = chat(behind_proxy.port, world.example_bundle, None, {**bearer, **forwarded(holder)}, tls=False)
    assert good.status == 200, good.body
    other = chat(behind_proxy.port, world.example_bundle, None, {**bearer, **forwarded(world.svid("/x"))}, tls=False)
    assert_refused(other, "token is bound to another client certificate")


def test_the_header_is_ignored_from_an_address_not_listed(
    make_gateway: Any, world: World, trusted: TestIssuer, shared_upstream: Upstream
) -> None:
    gateway = make_gateway(proxy_config(world, trusted, shared_upstream, ["10.9.9.9/32"]))
    answer = chat(gateway.port, world.example_bundle, None, forwarded(world.svid("/agents/a1")), tls=False)
    assert_refused(answer, "no bearer token", "missing_token")


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, world: World, trusted: TestIssuer, shared_upstream: Upstream
) -> Iterator[TlsGateway]:
    """Behind a proxy that must also present its own X.509-SVID."""
    proxies = {"addresses": ["127.0.0.1/32"], "proxy_identities": ["spiffe://example.org/proxy"]}
    gateway = TlsGateway(
        tls_config(world, trusted, shared_upstream, trusted_proxies=proxies), tmp_path_factory.mktemp("guarded")
    )
    yield gateway
    gateway.stop()


def test_a_proxy_that_must_authenticate_itself(guarded: TlsGateway, world: World) -> None:
    proxy, alice = world.svid("/proxy"), world.svid("/agents/alice")
    answer = chat(guarded.port, world.example_bundle, proxy, forwarded(alice))
    assert answer.status == 200, answer.body
    assert record_of(guarded, answer)["subject"]["id"] == "spiffe://example.org/agents/alice"
    # From the proxy's address, without the proxy's certificate: the header is not believed.
    for connection_cert in (None, world.svid("/agents/impostor")):
        refused = chat(guarded.port, world.example_bundle, connection_cert, forwarded(alice))
        assert_refused(refused, "without the proxy's own client certificate")
    # The proxy's own certificate is never the client's identity.
    assert_refused(chat(guarded.port, world.example_bundle, proxy), "no bearer token", "missing_token")


def request_with(headers: dict[str, str], client: str = "127.0.0.1") -> Any:
    from idgate.proxy.http import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "client": (client, 4000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


def test_envoy_xfcc_header(world: World) -> None:
    sources = [TrustSource("spiffe://example.org", "example.org", load_authorities(world.example_bundle))]
    proxies = TrustedProxies.model_validate({"addresses": ["127.0.0.1/32"], "header_format": "xfcc"})
    certificates = ClientCertificates(sources, proxies=proxies)
    alice = world.svid("/agents/alice")
    cert = quote(alice.pem.decode(), safe="")
    element = f'By=spiffe://example.org/idgate;Hash=0f;Cert="{cert}";Subject="CN=workload";URI=spiffe://example.org/agents/alice'
    peer = certificates.peer_certificate(request_with({"x-forwarded-client-cert": element}))
    assert peer is not None and str(peer.spiffe_id) == "spiffe://example.org/agents/alice" and peer.forwarded
    with pytest.raises(Exception, match="holds 2 elements"):
        certificates.peer_certificate(request_with({"x-forwarded-client-cert": f"{element},{element}"}))
    assert certificates.peer_certificate(request_with({"x-forwarded-client-cert": "By=spiffe://x;Hash=0f"})) is None
    # A dual-stack socket sees the IPv4 proxy as an IPv4-mapped IPv6 address.
    assert certificates.peer_certificate(request_with({"x-forwarded-client-cert": element}, "::ffff:127.0.0.1"))
    # The same header from another address is not read at all.
    assert certificates.peer_certificate(request_with({"x-forwarded-client-cert": element}, "192.0.2.1")) is None


# -- the serving layer: the ASGI TLS extension, `idgate serve --workers` -----------------------


async def echo_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A raw ASGI app that answers with the TLS extension it was given."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = orjson.dumps(scope.get("extensions", {}).get("tls"))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def test_the_app_gets_the_asgi_tls_extension(
    world: World, trusted: TestIssuer, shared_upstream: Upstream, tmp_path: Path
) -> None:
    config = parse_config(tls_config(world, trusted, shared_upstream), {"IDGATE_HOME": str(tmp_path)})
    options = uvicorn_options(config)
    assert options["http"] == "idgate.serve:TlsHttpToolsProtocol"
    port = free_port()
    server = ServerThread(echo_tls, port, options)
    try:
        workload = world.svid("/agents/echo", issuer=world.example_inter)
        tls = call(port, world.example_bundle, workload, path="/", requests=2).json()
        anonymous = call(port, world.example_bundle, None, path="/").json()
    finally:
        server.stop()
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in tls["client_cert_chain"]]
    # The verified chain: the leaf, the intermediate it came with, the trust anchor.
    assert chain == [workload.certificate, world.example_inter.certificate, world.example.certificate]
    assert tls["client_cert_name"] == "CN=workload" and tls["client_cert_error"] is None
    assert tls["tls_version"] in (0x0303, 0x0304) and isinstance(tls["cipher_suite"], int)
    assert anonymous["client_cert_chain"] == [] and anonymous["client_cert_name"] is None
    assert issubclass(TlsHttpToolsProtocol, HttpToolsProtocol)


def test_idgate_serve_with_tls_and_two_workers(
    world: World, trusted: TestIssuer, shared_upstream: Upstream, tmp_path: Path
) -> None:
    config = tls_config(world, trusted, shared_upstream)
    config["server"]["audiences"] = ["idgate-test"]
    config_file = tmp_path / "idgate.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "IDGATE_HOME": str(tmp_path / "home"), "TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    command = [
        sys.executable,
        "-m",
        "idgate",
        "serve",
        "--config",
        str(config_file),
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    workload = world.svid("/agents/served")
    try:
        answers: list[Answer] = []

        def served() -> bool:
            if process.poll() is not None:
                assert process.stdout is not None
                raise AssertionError(f"idgate serve exited: {process.stdout.read().decode()[-2000:]}")
            try:
                answers.append(chat(port, world.example_bundle, workload))
            except OSError:
                return False
            return True

        wait_for(served, 20)
        assert answers[-1].status == 200, answers[-1].body
        # Several connections, so that both workers answer one; each knows the certificate.
        for _ in range(6):
            assert chat(port, world.example_bundle, workload).status == 200
        assert_refused(chat(port, world.example_bundle, world.svid("/x", ca=True)), "is a CA certificate")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate(timeout=5)
    assert f"serving on https://127.0.0.1:{port}" in output.decode()


# -- configuration ------------------------------------------------------------------------------


def test_tls_configuration_errors(world: World, trusted: TestIssuer, shared_upstream: Upstream, tmp_path: Path) -> None:
    config = tls_config(world, trusted, shared_upstream)
    config["server"]["tls"]["client_certificates"] = "required"
    del config["server"]["tls"]["client_ca_files"]
    config["spiffe"] = [{"name": "mesh", "trust_domain": "example.org", "jwks_file": str(world.example_bundle)}]
    with pytest.raises(ConfigError, match=r"`required` needs `server\.tls\.client_ca_files`"):
        parse_config(config, {})
    config = tls_config(world, trusted, shared_upstream)
    config["server"] = {"trusted_proxies": {"addresses": ["10.0.0.0/8"], "proxy_identities": ["spiffe://x/p"]}}
    with pytest.raises(ConfigError, match="proxies can present a certificate only when idgate serves TLS"):
        parse_config(config, {})
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    config = tls_config(world, trusted, shared_upstream)
    config["server"]["tls"]["client_ca_files"] = [str(bad)]
    with pytest.raises(ConfigError, match="is not PEM certificates or a SPIFFE bundle"):
        uvicorn_options(parse_config(config, {"IDGATE_HOME": str(tmp_path)}))


def test_a_spiffe_domain_with_only_an_x509_bundle(world: World, trusted: TestIssuer, shared_upstream: Upstream) -> None:
    config = parse_config(tls_config(world, trusted, shared_upstream), {})
    assert config.server.url.startswith("https://")
    assert [s.trust_domain for s in config.spiffe if s.jwks_file is None and s.jwks_uri is None] == [
        "example.org",
        "partner.org",
    ]
    assert load_authorities(world.partner_bundle) == (world.partner.certificate,)


def test_thumbprint_is_rfc_8705_x5t_s256(world: World) -> None:
    der = world.server.der
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert thumbprint(der) == expected and len(expected) == 43
    assert ssl.PEM_cert_to_DER_cert(world.server.certificate.public_bytes(serialization.Encoding.PEM).decode()) == der


def test_a_token_from_the_token_endpoint_over_mtls_is_bound_to_the_certificate(
    door: TlsGateway, world: World, trusted: TestIssuer
) -> None:
    holder = world.svid("/agents/exchanger")
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": trusted.mint(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
    }
    body = "&".join(f"{k}={quote(v, safe='')}" for k, v in form.items()).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    issued = call(
        door.port, world.example_bundle, holder, method="POST", path="/oauth2/token", headers=headers, body=body
    )
    assert issued.status == 200, issued.body
    token = issued.json()["access_token"]
    payload = orjson.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["cnf"] == {"x5t#S256": thumbprint(holder.der)}
    bearer = {"Authorization": f"Bearer {token}"}
    assert chat(door.port, world.example_bundle, holder, bearer).status == 200
    assert_refused(
        chat(door.port, world.example_bundle, world.svid("/agents/thief"), bearer), "another client certificate"
    )
