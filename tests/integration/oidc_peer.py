"""A real OpenID provider for the tests: npm `oidc-provider`, run with Node.

`tests/peers/oidc/` holds the pinned package (package.json and its lock) and
`provider.mjs`, which configures it: one public client, `chat-app`, that signs a
person in with the authorization code flow and PKCE (RFC 7636) through the
provider's development login and consent pages; resource indicators (RFC 8707)
turn the access token into a JWT (RFC 9068) whose `aud` is the resource asked
for. See the script's header for its resource servers.

`install()` runs `npm ci` when `node_modules` is missing or older than the lock
(`make test` does it first). `OidcProvider` starts the provider on a free
loopback port and stops it; `sign_in()` walks the browser's part of the flow
over HTTP — authorization request, login form, consent form, the redirect with
the code — and redeems the code at the token endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import html.parser
import http.cookiejar
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.support import free_port

PEER_DIR = Path(__file__).resolve().parent.parent / "peers" / "oidc"
CLIENT_ID = "chat-app"
REDIRECT_URI = "http://127.0.0.1/callback"  # never fetched: the code is read from the redirect itself
GATEWAY_RESOURCE = "https://idgate.test"
OTHER_RESOURCE = "https://other.test"


class PeerError(RuntimeError):
    """The provider could not be installed or started, or the flow went astray."""


def install(timeout: float = 300) -> None:
    """`npm ci` in the peer folder, unless its `node_modules` already matches the lock."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise PeerError("Node.js and npm are needed for the OpenID provider peer (tests/peers/oidc)")
    lock_path = Path(tempfile.gettempdir()) / "idgate-oidc-peer-npm.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once install once
        if _installed():
            return
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PEER_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise PeerError(f"npm ci failed in {PEER_DIR}:\n{done.stdout}\n{done.stderr}")


def _installed() -> bool:
    marker = PEER_DIR / "node_modules" / ".package-lock.json"  # written by npm at the end of an install
    newest = max((PEER_DIR / name).stat().st_mtime for name in ("package.json", "package-lock.json"))
    return marker.exists() and marker.stat().st_mtime >= newest


@dataclass(frozen=True)
class SignIn:
    """What the token endpoint answered to the redeemed code."""

    access_token: str
    id_token: str
    scope: str
    token_type: str


class OidcProvider:
    """`node provider.mjs PORT` on a free loopback port, until `stop()`."""

    def __init__(self, start_timeout: float = 20) -> None:
        node = shutil.which("node")
        if node is None:
            raise PeerError("Node.js is needed for the OpenID provider peer")
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        # stdin stays open: the script exits when it closes, so it never outlives this process.
        self._process = subprocess.Popen(
            [node, "provider.mjs", str(self.port)],
            cwd=PEER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._stderr: list[str] = []
        assert self._process.stderr is not None
        self._stderr_reader = threading.Thread(target=_drain, args=(self._process.stderr, self._stderr), daemon=True)
        self._stderr_reader.start()
        ready = self._ready_line(start_timeout)
        if json.loads(ready).get("issuer") != self.issuer:
            self.stop()
            raise PeerError(f"the provider announced {ready!r}, expected issuer {self.issuer}")

    def _ready_line(self, timeout: float) -> str:
        """The script's first stdout line, read in a thread so that a silent provider cannot hang the test."""
        stdout = self._process.stdout
        assert stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not lines or not lines[0]:
            self.stop()
            raise PeerError(f"the OpenID provider did not start:\n{''.join(self._stderr)}")
        return lines[0]

    def stop(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self._process.stdin is not None
                self._process.stdin.close()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._stderr_reader.join(5)  # the provider is gone: its stderr is at its end
        for stream in (self._process.stdout, self._process.stdin, self._process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def discovery(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.issuer}/.well-known/openid-configuration", timeout=5) as response:
            document: dict[str, Any] = json.load(response)
            return document

    def sign_in(self, login: str, *, resource: str = GATEWAY_RESOURCE, scope: str = "chat models:read") -> SignIn:
        """A person signs in to `chat-app`: authorization code + PKCE, the tokens it gets."""
        browser = _Browser()
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(16)
        query = {
            "client_id": CLIENT_ID,
            "response_type": "code",
            "redirect_uri": REDIRECT_URI,
            "scope": f"openid {scope}",
            "resource": resource,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
            "nonce": secrets.token_urlsafe(16),
        }
        url = f"{self.issuer}/auth?{urllib.parse.urlencode(query)}"
        code = None
        for _ in range(12):  # authorize, login page, resume, consent page, resume, callback: bounded
            page = browser.get(url)
            if page.location is not None:
                if page.location.startswith(REDIRECT_URI):
                    answer = urllib.parse.parse_qs(urllib.parse.urlsplit(page.location).query)
                    if answer.get("state") != [state] or answer.get("iss") != [self.issuer]:
                        raise PeerError(f"callback with a wrong state or issuer: {answer}")
                    code = answer["code"][0]
                    break
                url = page.location
                continue
            form = _Form.parse(page.body)
            fields = dict(form.fields)
            if fields.get("prompt") == "login":
                fields |= {"login": login, "password": "any password works in devInteractions"}
            elif fields.get("prompt") != "consent":
                raise PeerError(f"unexpected page at {url}: {page.status} {page.body[:300]!r}")
            posted = browser.post(urllib.parse.urljoin(url, form.action), fields)
            if posted.location is None:
                raise PeerError(f"form at {url} did not redirect: {posted.status} {posted.body[:300]!r}")
            url = posted.location
        if code is None:
            raise PeerError("the authorization flow did not reach the callback")
        token = browser.post(
            f"{self.issuer}/token",
            {
                "grant_type": "authorization_code",
                "code": code,
                "code_verifier": verifier,
                "client_id": CLIENT_ID,
                "redirect_uri": REDIRECT_URI,
            },
        )
        if token.status != 200:
            raise PeerError(f"token endpoint: {token.status} {token.body!r}")
        body = json.loads(token.body)
        return SignIn(body["access_token"], body["id_token"], body.get("scope", ""), body["token_type"])


def _drain(stream: IO[str], into: list[str]) -> None:
    """Keep the provider's stderr (its warnings) for error messages, so the pipe never fills."""
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            into.append(line)


@dataclass
class _Page:
    status: int
    location: str | None  # absolute, for a redirect
    body: bytes


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the flow follows redirects itself: the last one goes to the client's callback


class _Browser:
    """A cookie-keeping HTTP client that shows redirects instead of following them."""

    def __init__(self) -> None:
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirects()
        )

    def get(self, url: str) -> _Page:
        return self._open(urllib.request.Request(url))

    def post(self, url: str, form: dict[str, str]) -> _Page:
        return self._open(urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST"))

    def _open(self, request: urllib.request.Request) -> _Page:
        try:
            response = self._opener.open(request, timeout=10)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            body = response.read()
            location = response.headers.get("Location")
            status: int = response.status
        return _Page(status, urllib.parse.urljoin(request.full_url, location) if location else None, body)


class _Form(html.parser.HTMLParser):
    """The one form of a login or consent page: its action and its fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: list[tuple[str, str]] = []

    @classmethod
    def parse(cls, page: bytes) -> _Form:
        form = cls()
        form.feed(page.decode())
        if not form.action:
            raise PeerError(f"no form on the page: {page[:300]!r}")
        return form

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and not self.action:
            self.action = values.get("action", "")
        elif tag == "input" and values.get("name"):
            self.fields.append((values["name"], values.get("value", "")))
