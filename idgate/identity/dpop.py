"""DPoP (RFC 9449): tokens bound to a key the caller holds, proven afresh on every request.

A client makes a key pair and sends, with each request, a *proof*: a small JWT
(`typ: dpop+jwt`) carrying its public key in the header (`jwk`), signed by the
private key, naming this request (`htm` method, `htu` URL), when (`iat`), once
(`jti`) and, at a resource, which access token it goes with (`ath`, the SHA-256
of the token). The token service binds a token to the key's thumbprint (RFC
7638) as `cnf.jkt`; from then on the token is worth nothing without the key.

`DPoPVerifier.verify` checks one proof (RFC 9449 §4.3), each failure a refusal:
exactly one proof, `typ`, an asymmetric allowed `alg`, a public `jwk` (no
private members) that fits the `alg`, the signature, `htm`, `htu` (scheme,
host, port and path of the request as the gateway's public URL names it;
query and fragment ignored; compared after RFC 3986 normalization), `iat`
within the window, `ath` when a token comes with it, the key's thumbprint when
a token is bound to one, a server nonce when required, and last an unseen
`jti` (the replay cache, shared by every worker).

Nonces (§8, §9) are stateless so that any worker accepts any worker's nonce:
`base64url(time || HMAC-SHA256(key, time)[:16])`, the key in the state folder.

`DPoPCheck` is the per-call `CredentialCheck` of the gate: a token with
`cnf.jkt` must come as `Authorization: DPoP TOKEN` with a valid proof for that
key; sent as `Bearer` it is refused (§7.2), and so is an unbound token sent with
the `DPoP` scheme (there is no key the proof could be matched to, §4.3 step 12).
Refusals are 401 with `WWW-Authenticate: DPoP error="invalid_dpop_proof"`
(or `use_dpop_nonce` with a fresh `DPoP-Nonce`) and the accepted `algs`.

A proof is unique per request, so only its key is cached (by the header
segment, which holds the key): the signature is checked every time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from idgate.errors import InvalidToken, shown
from idgate.identity.principal import Caller
from idgate.identity.replay import ReplayCache
from idgate.proxy.http import Request
from idgate.store.keyfile import state_key
from idgate.sts.client_settings import PRIVATE_MEMBERS, DPoPSettings

__all__ = [
    "NONCE_FILE",
    "DPoPCheck",
    "DPoPRefusal",
    "DPoPVerifier",
    "Nonces",
    "Proof",
    "ProofError",
    "access_token_hash",
    "authorization_scheme",
    "build_verifier",
    "jwk_thumbprint",
    "normalize_url",
    "single_proof",
]

log = logging.getLogger("idgate.identity")

NONCE_FILE = "dpop-nonce.key"
MAX_PROOF_BYTES = 8192
_MAX_JTI = 256
_KEY_CACHE = 1024

_HASHES: dict[str, hashes.HashAlgorithm] = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
_CURVES: dict[str, tuple[str, ec.EllipticCurve, int]] = {
    "ES256": ("P-256", ec.SECP256R1(), 32),
    "ES384": ("P-384", ec.SECP384R1(), 48),
    "ES512": ("P-521", ec.SECP521R1(), 66),
}
# RFC 7638 §3.2: the members of each key type a thumbprint is taken over.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class ProofError(Exception):
    """A proof that does not hold; `error` is `invalid_dpop_proof` or `use_dpop_nonce`."""

    def __init__(self, message: str, error: str = "invalid_dpop_proof") -> None:
        super().__init__(message)
        self.message = message
        self.error = error


class DPoPRefusal(InvalidToken):
    """A refusal at a resource: 401 with a `DPoP` challenge (and a fresh nonce when one is needed)."""

    scheme = "DPoP"

    def __init__(self, message: str, code: str, algs: Iterable[str], nonce: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.challenge_params = f'algs="{" ".join(algs)}"'
        if nonce is not None:
            self.headers = ((b"dpop-nonce", nonce.encode()),)


@dataclass(frozen=True, slots=True)
class Proof:
    """A verified proof: the key's thumbprint, and what made it unique."""

    jkt: str
    jti: str
    iat: float


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def access_token_hash(token: str) -> str:
    """`ath`: base64url of the SHA-256 of the access token's ASCII bytes (RFC 9449 §4.2)."""
    return _b64encode(hashlib.sha256(token.encode("ascii", "replace")).digest())


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url: what `cnf.jkt` holds."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise ProofError("the `jwk` is not a complete RSA, EC or OKP public key")
    canonical = orjson.dumps({m: jwk[m] for m in members}, option=orjson.OPT_SORT_KEYS)
    return _b64encode(hashlib.sha256(canonical).digest())


def authorization_scheme(authorization: bytes | None) -> tuple[str, str]:
    """(`bearer` | `dpop` | other scheme lowercased, the token) of an `Authorization` value."""
    if not authorization:
        return "", ""
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    return scheme.lower(), token.strip()


def _normalize_path(path: str) -> str:
    """RFC 3986 §6.2.2: percent-encodings upper-cased, unreserved characters decoded."""

    def fix(match: re.Match[str]) -> str:
        char = unquote(match.group(0))
        return char if char in _UNRESERVED else match.group(0).upper()

    return _PCT.sub(fix, path) or "/"


def normalize_url(url: str) -> str | None:
    """`scheme://host[:port]/path` of an http(s) URL, normalized (RFC 3986 §6.2.2-6.2.3); None if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    authority = host if port is None or port == default else f"{host}:{port}"
    return f"{scheme}://{authority}{_normalize_path(parts.path)}"


def _public_key(alg: str, jwk: dict[str, Any]) -> Any:
    """The cryptography public key of a JWK that fits `alg`, or a `ProofError`."""
    kty = jwk.get("kty")
    try:
        if alg.startswith("ES"):
            crv, curve, size = _CURVES[alg]
            if kty != "EC" or jwk.get("crv") != crv:
                raise ProofError(f"`alg` `{alg}` needs an EC key on curve `{crv}`")
            x, y = _b64decode(jwk["x"]), _b64decode(jwk["y"])
            if len(x) != size or len(y) != size:
                raise ProofError("the EC key's coordinates have the wrong length")
            numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve)
            return numbers.public_key()
        if alg.startswith(("RS", "PS")):
            if kty != "RSA":
                raise ProofError(f"`alg` `{alg}` needs an RSA key")
            n = int.from_bytes(_b64decode(jwk["n"]), "big")
            if n.bit_length() < 2048:
                raise ProofError("RSA keys shorter than 2048 bits are not accepted")
            return rsa.RSAPublicNumbers(int.from_bytes(_b64decode(jwk["e"]), "big"), n).public_key()
        if alg in ("EdDSA", "Ed25519", "Ed448"):
            curves = ("Ed25519", "Ed448") if alg == "EdDSA" else (alg,)
            if kty != "OKP" or jwk.get("crv") not in curves:
                raise ProofError(f"`alg` `{alg}` needs an OKP key on curve `{'` or `'.join(curves)}`")
            raw = _b64decode(jwk["x"])
            if jwk["crv"] == "Ed25519":
                return ed25519.Ed25519PublicKey.from_public_bytes(raw)
            return ed448.Ed448PublicKey.from_public_bytes(raw)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ProofError("the `jwk` is not a valid public key for its `alg`") from None
    raise ProofError(f"`alg` `{shown(alg)}` is not supported")


def _verify_signature(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg.startswith("ES"):
            size = _CURVES[alg][2]
            if len(signature) != 2 * size:
                return False
            r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(_HASHES[alg[2:]]))
        elif alg.startswith("RS"):
            key.verify(signature, signing_input, padding.PKCS1v15(), _HASHES[alg[2:]])
        elif alg.startswith("PS"):
            digest = _HASHES[alg[2:]]
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            key.verify(signature, signing_input, pss, digest)
        else:
            key.verify(signature, signing_input)
    except (InvalidSignature, ValueError):
        return False
    return True


class Nonces:
    """Stateless server nonces: any worker sharing the key file issues and accepts them."""

    def __init__(self, secret: bytes, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._lifetime = lifetime
        self._clock = clock
        self._current: tuple[int, str] = (-1, "")

    @classmethod
    def from_state(cls, home: Path, lifetime: float, clock: Callable[[], float] = time.time) -> Nonces:
        """The nonce key in `home` (created once, shared by every worker, mode 0600)."""
        return cls(state_key(home, NONCE_FILE), lifetime, clock)

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._secret, b"dpop-nonce\0" + stamp, hashlib.sha256).digest()[:16]

    def issue(self) -> str:
        """A nonce valid for the lifetime; the same one within a second (cheap to hand out on every answer)."""
        now = int(self._clock())
        if self._current[0] != now:
            stamp = now.to_bytes(8, "big")
            self._current = (now, _b64encode(stamp + self._mac(stamp)))
        return self._current[1]

    def valid(self, nonce: str) -> bool:
        if len(nonce) != 32:
            return False
        try:
            raw = _b64decode(nonce)
        except (binascii.Error, ValueError):
            return False
        stamp, mac = raw[:8], raw[8:]
        if len(raw) != 24 or not hmac.compare_digest(mac, self._mac(stamp)):
            return False
        age = self._clock() - int.from_bytes(stamp, "big")
        return -5 <= age <= self._lifetime


@dataclass(frozen=True, slots=True)
class _Key:
    alg: str
    key: Any
    jkt: str


class DPoPVerifier:
    """Checks DPoP proofs against the request they came with; see the module docstring."""

    def __init__(
        self,
        settings: DPoPSettings,
        *,
        public_url: str,
        replay: ReplayCache,
        nonces: Nonces | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`public_url`: the gateway's URL as callers name it (`server.url`); `htu` is compared to it + path."""
        self.algorithms = tuple(settings.algorithms)
        self._allowed = frozenset(settings.algorithms)
        self._window = float(settings.iat_window_seconds)
        self._require_nonce = settings.require_nonce
        self._nonces = nonces
        if self._require_nonce and nonces is None:
            raise ValueError("server nonces are required but no nonce source was given")
        self._replay = replay
        self._clock = clock
        base = urlsplit(public_url)
        self._base_path = base.path.rstrip("/")
        self._origin = f"{base.scheme}://{base.netloc}"
        self._keys: dict[str, _Key] = {}

    @property
    def require_nonce(self) -> bool:
        return self._require_nonce

    def nonce(self) -> str | None:
        """A fresh server nonce, when nonces are in use."""
        return self._nonces.issue() if self._nonces is not None else None

    def url(self, path: str) -> str:
        """The public URL of a request path: what `htu` must name."""
        return f"{self._origin}{self._base_path}{path}"

    async def verify(
        self, proof: str, *, method: str, url: str, access_token: str | None = None, jkt: str | None = None
    ) -> Proof:
        """Verify `proof` for a `method` request to `url`; `access_token`/`jkt`: what it must go with."""
        if len(proof) > MAX_PROOF_BYTES:
            raise ProofError("the DPoP proof is too large")
        parts = proof.split(".")
        if len(parts) != 3:
            raise ProofError("the DPoP proof is not a JWT (expected three `.`-separated parts)")
        key = self._key(parts[0])
        try:
            claims = orjson.loads(_b64decode(parts[1]))
            signature = _b64decode(parts[2])
        except (binascii.Error, ValueError):
            raise ProofError("the DPoP proof's payload is not base64url-encoded JSON") from None
        if not isinstance(claims, dict):
            raise ProofError("the DPoP proof's payload is not a JSON object")
        if not _verify_signature(key.alg, key.key, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
            raise ProofError("the DPoP proof's signature is invalid")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI:
            raise ProofError("the DPoP proof has no valid `jti`")
        if claims.get("htm") != method:
            raise ProofError(f"the DPoP proof's `htm` must be `{method}`")
        htu = claims.get("htu")
        if not isinstance(htu, str) or (htu != url and normalize_url(htu) != normalize_url(url)):
            raise ProofError(f"the DPoP proof's `htu` must be `{normalize_url(url)}`")
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)) or isinstance(iat, bool):
            raise ProofError("the DPoP proof has no `iat`")
        now = self._clock()
        if abs(now - iat) > self._window:
            raise ProofError(f"the DPoP proof's `iat` is not within {int(self._window)} seconds of now")
        if access_token is not None:
            ath = claims.get("ath")
            if not isinstance(ath, str):
                raise ProofError("the DPoP proof has no `ath` (the hash of the access token it comes with)")
            if not hmac.compare_digest(ath, access_token_hash(access_token)):
                raise ProofError("the DPoP proof's `ath` does not match the access token")
        if jkt is not None and not hmac.compare_digest(key.jkt, jkt):
            raise ProofError("the DPoP proof is signed by another key than the one the token is bound to")
        if self._require_nonce:
            assert self._nonces is not None
            nonce = claims.get("nonce")
            if not isinstance(nonce, str) or not self._nonces.valid(nonce):
                message = "a server nonce is required" if nonce is None else "the DPoP nonce is not valid or too old"
                raise ProofError(f"{message}: use the one in the `DPoP-Nonce` header", "use_dpop_nonce")
        # Last, so that a proof refused for anything else does not use up its `jti`.
        if not await self._replay.first_use("dpop", f"{key.jkt}:{jti}", float(iat) + self._window + 1):
            raise ProofError("the DPoP proof was used before (`jti` replay)")
        return Proof(key.jkt, jti, float(iat))

    def _key(self, segment: str) -> _Key:
        cached = self._keys.get(segment)
        if cached is not None:
            return cached
        try:
            header = orjson.loads(_b64decode(segment))
        except (binascii.Error, ValueError):
            raise ProofError("the DPoP proof's header is not base64url-encoded JSON") from None
        if not isinstance(header, dict):
            raise ProofError("the DPoP proof's header is not a JSON object")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
            raise ProofError("the DPoP proof's `typ` must be `dpop+jwt`")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise ProofError(
                f"the DPoP proof's `alg` `{shown(alg)}` is not accepted; accepted: {' '.join(self.algorithms)}"
            )
        if header.get("crit"):
            raise ProofError("the DPoP proof has critical header parameters this gateway does not understand")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise ProofError("the DPoP proof's header has no `jwk` (the public key)")
        if PRIVATE_MEMBERS & jwk.keys():
            raise ProofError("the DPoP proof's `jwk` contains a private key")
        key = _Key(alg, _public_key(alg, jwk), jwk_thumbprint(jwk))
        if len(self._keys) >= _KEY_CACHE:
            with contextlib.suppress(StopIteration, KeyError):
                del self._keys[next(iter(self._keys))]
        self._keys[segment] = key
        return key


def _proof_headers(request: Request) -> list[bytes]:
    return [value for name, value in request.scope["headers"] if name.lower() == b"dpop"]


def single_proof(request: Request) -> str | None:
    """The one `DPoP` header of a request; None when there is none, a `ProofError` when there are several."""
    values = _proof_headers(request)
    if not values:
        return None
    if len(values) > 1:
        raise ProofError("send exactly one `DPoP` header")
    try:
        return values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise ProofError("the `DPoP` header is not ASCII") from None


class DPoPCheck:
    """The gate's binding check for DPoP-bound tokens (a `CredentialCheck`)."""

    def __init__(self, verifier: DPoPVerifier) -> None:
        self._verifier = verifier

    def _refuse(self, message: str, code: str = "invalid_dpop_proof") -> DPoPRefusal:
        nonce = self._verifier.nonce() if code == "use_dpop_nonce" else None
        return DPoPRefusal(message, code, self._verifier.algorithms, nonce)

    async def __call__(self, caller: Caller, request: Request) -> None:
        scheme, token = authorization_scheme(request.header(b"authorization"))
        jkt = caller.credential.jkt
        if jkt is None:
            if scheme == "dpop":
                raise self._refuse("this token is not DPoP-bound: send it as `Authorization: Bearer`", "invalid_token")
            return
        if scheme != "dpop":
            raise self._refuse(
                "this token is DPoP-bound: send it as `Authorization: DPoP TOKEN` with a `DPoP` proof", "invalid_token"
            )
        try:
            proof = single_proof(request)
            if proof is None:
                raise ProofError("this token is DPoP-bound: send a `DPoP` proof of its key")
            path = request.scope.get("raw_path") or request.path.encode()
            url = self._verifier.url(path.decode("latin-1") if isinstance(path, bytes) else str(path))
            await self._verifier.verify(proof, method=request.method, url=url, access_token=token, jkt=jkt)
        except ProofError as error:
            raise self._refuse(error.message, error.error) from None


def build_verifier(settings: DPoPSettings, public_url: str, home: Path, replay: ReplayCache) -> DPoPVerifier:
    """The verifier of a gateway: its public URL, the replay cache and (when required) nonces from `home`."""
    nonces = Nonces.from_state(home, settings.nonce_lifetime_seconds) if settings.require_nonce else None
    return DPoPVerifier(settings, public_url=public_url, replay=replay, nonces=nonces)
