"""The MCP gateway: `/mcp/{server}` relays MCP streamable HTTP, one call at a time through the house.

    caller ─► identity ─► JSON-RPC ─► policy + budget ─► mint ─► upstream ─► answer
                 └────────────┴────────────┴───────────┴───────────┴────────┴─► audit

A POST carries one JSON-RPC message (batches, messages nested deeper than 64
levels and ids beginning `idgate-list:` are refused, 400). For it:

1. **identity**: the `Authorization` bearer token becomes a `Caller` (the gate:
   signature, issuer, audience, binding, liveness); a refusal is a 401 whose
   `WWW-Authenticate` names this server's RFC 9728 metadata,
   `/.well-known/oauth-protected-resource/mcp/{server}`. A token for the gateway
   is good at every MCP endpoint; one narrowed to MCP resources
   (`{gateway}/mcp/{server}`, RFC 8707) only at those.
2. **policy**, for `tools/call`, `resources/read` and `prompts/get`: the tool
   `SERVER/NAME` (a resource is `SERVER/resource:URI`, a prompt
   `SERVER/prompt:NAME`, both `read`) with its action class (from the entity
   data, else the server's `tools`, else `unknown_tool_class`) and the data
   class of the arguments, through the same authorizer as model calls.
   `resources/subscribe` and `resources/unsubscribe` are decided as a
   `resources/read` of their `uri`, and `completion/complete` as what its
   `ref` completes for: a `ref/prompt` as that prompt's `prompts/get`, a
   `ref/resource` as a `resources/read` of its URI or template (any other ref
   is a 400, -32602); the data class is its `argument`'s and `context`'s.
   `subscriptions/listen` (2026-07-28) is decided as a `resources/read` of
   every URI in its `notifications.resourceSubscriptions`: one refused refuses
   the whole listen (params it cannot read are a 400, -32602). A tool
   withheld as changed (see `pins.py`) is refused, and so is any non-read call
   through a server without minted credentials. Then the budgets
   (`budgets.py`).
   A refusal is a JSON-RPC error (403, or 429 for a budget) whose `data` holds
   the decision id; it is on record, and the upstream never sees the call.
3. **the credential**: for every request the upstream gets a token minted for
   it alone: `aud` the server, `scope` the one tool and its action class
   (`tool:NAME action:CLASS`; `mcp:METHOD` for other methods), `sub`, `act`,
   `task`, `request_id`, seconds of life (never past the caller's own
   credential's expiry), signed with the gateway's key (its JWKS at
   `/.well-known/jwks.json`). The caller's `Authorization` is never sent.
4. **the call**: the identity and decision records are committed first; then
   the message goes upstream with the MCP headers (`Mcp-Session-Id`,
   `MCP-Protocol-Version`, and the routing headers, checked:
   see below) and a `traceparent` of the gateway's own: the request's trace
   (the caller's, if it sent a valid one), the request's span as the parent
   (`upstream_traceparent`); the caller's `traceparent`, `tracestate`
   and `baggage` are never relayed as they came. A JSON answer is read whole
   (`max_response_bytes`, within `timeout.read`), the caller's credential asked
   again, and its one message passes as it came if it is an answer, else is
   written as a stream's message is (a resource update only to who may read
   it; refused: a JSON-RPC error for the request); an event-stream answer event
   by event, each written anew as a GET's stream is (below: its list answers
   filtered, resource updates checked, the caller's credential checked again
   before each read's events); list answers are read whole (below). An upstream that is down, slow or refuses
   the gateway's credential is a 502/504 with a JSON-RPC error, never a hang.

**List answers** (`tools/list`, `resources/list`, `resources/templates/list`,
`prompts/list`) show a caller only what it may use: an entry is kept only if
the call it names would be allowed — `tools/call` on a tool (never one withheld
as changed), `resources/read` on a resource's `uri` (a template's own
`uriTemplate`: its expansions cannot be known), `prompts/get` on a prompt —
decided by `_authorize` exactly as `_decide` decides that call (same caller,
actor chain, task, action class, and the data class the request's header and
tenant give), but with no decision record per entry: one `list_filtered`
action record per answer says how many were listed and withheld. On a POST
the answer is read whole and written anew, never relayed as it came: one that
does not parse, or is not this request's result with its list (or an error),
is a 502; in an event stream (CRLF, CR or LF line ends) events whose data does
not parse are dropped. `nextCursor` and the request's `cursor` pass as they are.

**No resumption**: a request (any method) with `Last-Event-ID` is refused (400,
-32600) and nothing goes upstream: a server replays whatever stream an event id
names to whoever sends it, and event ids are not bound to their caller; binding
them by HMAC, as session ids are, is the way to bring resumption back.

A list answer could also arrive on a GET: a GET with `Last-Event-ID` makes the
server replay a POST's stream, answer included, as it first sent it (refused
now, but the defence stays, for resumption to come back). So a list
request goes upstream under an id of the gateway's own, `idgate-list:METHOD:ID`
(ID the caller's id as JSON), and the caller gets its own id back; a GET's
stream (resumed or the standalone one) is parsed and written anew event by
event: an answer under such an id is filtered for the caller of the GET as on
a POST (one that is not a list answer becomes a JSON-RPC error for the
caller's id, and a record); the server's requests and notifications (but see
resource updates below) pass; an answer under any other id is dropped (a client
takes an answer by its id: under the id of the caller's pending request, a list
say, it would stand in for that answer, unfiltered), and so, on a POST's stream
or JSON answer, is any answer but the one to that POST (a JSON answer then
becomes a JSON-RPC error); an event's data is read by orjson or, for what it refuses (`NaN`,
lone surrogates, deep nesting: what other encoders write), Python's `json`, and
written back by the same; one that is not a JSON object, or cannot be written
anew (nested past the interpreter's limit; a warning is logged), is dropped (on
a POST, such a list answer is a 502); an event with empty data (a resumption
cursor), an `id` or `retry` alone, or a comment passes without content. A
POST's event-stream answer (a `subscriptions/listen`, a long `tools/call`) is
written anew alike, and an event over `max_response_bytes` ends either stream
(a POST's with a JSON-RPC error for its request). A GET or DELETE answer that
is no event stream is read whole and its one message treated alike. Why this
and not remembering which requests were lists: the id travels with the
answer, so it holds on every worker and replica, after a restart and for any
replay, with no state to bound; nothing unattributable is left to drop. The cost: a `notifications/cancelled` for a
list request names the caller's id, which the server does not know.

**Resource updates** on any stream (a GET's, a POST's: `subscriptions/listen`
carries them): a `notifications/resources/updated` is relayed only if the
caller may read its `params.uri`, decided as a `resources/list` entry is
(`_authorize` on `resources/read` of the URI: same caller, actor chain, task
and the request's data class; no decision record per notification). One it may
not read, or whose `uri` is missing or not a string, is dropped with a warning
in the log naming the server and the request: a server must not leak, by
notifying, the names of resources a caller cannot read, nor when they change.
The method is matched in any case. A `notifications/subscriptions/acknowledged`
names in `params.notifications.resourceSubscriptions` only the URIs the caller
may read. Other notifications (list changes, messages, progress, cancellation)
pass.

**Answers end with the credential.** A caller's credential is checked when its
request comes; an answer may take minutes, a stream stay open for hours. So it
is checked again (`Gate.lapsed`: its `exp` on the gateway's clock, then
liveness — revoked, task completed, session ended, subject, agent or tenant
held — in memory: the token is not read again, no DPoP proof asked for) once
the upstream's headers came, before a JSON answer (read whole) goes down,
before the events of each read from an event stream are
relayed, and every `RECHECK_SECONDS` on a quiet stream. One that no longer
holds gets a 401 (`-32001`) instead of the answer, or its stream ends there:
nothing more relayed, the upstream answer closed, a POST's stream last gets a
JSON-RPC error for its request; the request's closing record (the identity
record's end; a `tool_call`'s `error`) says why: `credential_expired`,
`credential_revoked` with liveness's reason, or `unavailable` when liveness
cannot be known (fail closed: an outage of the state store longer than
`liveness.max_staleness_seconds` ends open streams).

A GET stream and a `subscriptions/listen` have no read timeout (quiet until
something happens), but their headers must come within `timeout.read`, and a
listen answered in JSON is read whole within it.

**Routing headers** (MCP 2026-07-28: copies of body fields, for proxies and
load balancers that route without reading the body) are checked once the caller
is known, on every message, not only on the decided ones: the decision is made
on the body, and a tool server, or whatever is in front of it, may act on the
headers. `Mcp-Method` must equal the body's method (requests, notifications,
answers: anything); `Mcp-Name` comes only with a method that names something
(`tools/call`, `prompts/get`: `params.name`; `resources/read`,
`resources/subscribe`, `resources/unsubscribe`: `params.uri`) and must equal
it; `Mcp-Param-X` comes only with `tools/call`, for the top-level argument
named X (in any case: the gateway does not hold the tool's `x-mcp-header`
annotations, so a tool whose annotation names another header than its
argument cannot be called with it), a string, integer or boolean, and must
equal it as the spec renders it (`true`/`false`, decimal digits; verbatim or
`=?base64?...?=`). None may come twice, and none with a GET or DELETE.
Otherwise the answer is a 400, JSON-RPC error -32020 (the spec's header
mismatch), and nothing goes upstream.

GET (the server's event stream) and DELETE (end a session) go upstream with a
minted token too; their answers are written anew (see list answers above). A
session (`Mcp-Session-Id`) belongs to the subject that opened it: the client
holds the upstream's id with an HMAC of it and the caller (`sessions.py`),
checked on every request on every worker; another caller presenting it, or a
bare or forged id, is refused (404). Both protocol generations pass: the
handshake-era `initialize` with sessions, and
2026-07-28's `server/discover` with self-contained requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from idgate.audit.records import (
    RequestFacts,
    identity_record,
    trace_context,
    upstream_traceparent,
)
from idgate.audit.writer import AuditWriter
from idgate.config import SecretRef
from idgate.errors import AuthenticationError, IdgateError, InvalidToken, PayloadTooLarge, shown
from idgate.identity.gate import RECHECK_SECONDS, Gate
from idgate.identity.principal import Caller
from idgate.mcp.budgets import BudgetExceeded, Budgets
from idgate.mcp.pins import PinStore, tool_hash
from idgate.mcp.records import arguments_digest, list_record, pin_record, tool_call_record, tool_decision_record
from idgate.mcp.sessions import SessionIds
from idgate.mcp.settings import McpServerConfig, McpSettings, StaticCredential
from idgate.policy.decision import Authorizer, Decision, Resource
from idgate.proxy.admission import DATA_CLASS_HEADER, Admission
from idgate.proxy.http import Request, Send, _challenge, send_bytes
from idgate.store.base import StateStore, StoreUnavailable
from idgate.sts.tokens import Grant, TokenMinter

__all__ = ["MCP_PREFIX", "MCP_RESOURCE_METADATA_PREFIX", "McpGateway", "mcp_resources"]

log = logging.getLogger("idgate.mcp")

Handler = Callable[[Request, Send], Awaitable[None]]

MCP_PREFIX = "/mcp/"
MCP_RESOURCE_METADATA_PREFIX = "/.well-known/oauth-protected-resource/mcp/"

# JSON-RPC error codes: the standard ones, and the gateway's own in the server range.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
UNAUTHENTICATED = -32001
REFUSED = -32003
HEADER_MISMATCH = -32020  # MCP 2026-07-28: HTTP headers that disagree with the body
BUDGET_EXCEEDED = -32029
UPSTREAM_FAILED = -32050

# The methods decided by policy before they go upstream. Subscribing to a resource and completing a prompt's or a
# resource template's arguments are decided as the read or the `prompts/get` they serve: what a caller may not
# read it may not watch, nor probe through completions.
CONTROLLED = frozenset(
    {
        "tools/call",
        "resources/read",
        "prompts/get",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
    }
)
_READS_URI = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
# MCP 2026-07-28 (SEP-2575): subscribing is a listen stream whose filter names the resource URIs it watches.
LISTEN = "subscriptions/listen"
_NO_ID = object()  # the id of no request: no answer matches it
# A server's word that a resource changed: relayed only to a caller who may read that resource.
RESOURCE_UPDATED = "notifications/resources/updated"
# A server's word (2026-07-28) on which resources a listen watches: told only those the caller may read.
SUBSCRIPTIONS_ACKNOWLEDGED = "notifications/subscriptions/acknowledged"
_READ = "read"
# The list methods whose answers are filtered per caller, and the field of the result that holds the entries.
LISTS = {
    "tools/list": "tools",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
    "prompts/list": "prompts",
}
# why: a list request goes upstream under an id of the gateway's own that names the method and the caller's id, so
# its answer is known for what it is on whatever stream it arrives (a GET with `Last-Event-ID` replays a POST's).
_LIST_ID = "idgate-list:"

# Request headers relayed upstream (never `authorization`, `cookie` or the like; nor the caller's
# `traceparent`, `tracestate` or `baggage`: the gateway sends a `traceparent` of its own, and the
# others are opaque caller data it cannot vet, not to cross into a tool server).
_UP_HEADERS = frozenset(
    {
        b"accept",
        b"content-type",
        b"mcp-session-id",
        b"mcp-protocol-version",
        b"mcp-method",
        b"mcp-name",
    }
)
_UP_PREFIX = b"mcp-param-"
# The routing headers of MCP 2026-07-28 (SEP-2243): copies of body fields for load balancers and
# proxies that route without reading the body. Each is checked against the body before it is relayed.
_METHOD_HEADER = b"mcp-method"
_NAME_HEADER = b"mcp-name"
# The methods that name something, and the `params` field their `Mcp-Name` copies.
_NAMED_BY = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}
# Response headers relayed back.
_DOWN_HEADERS = frozenset({"content-type", "mcp-session-id", "cache-control", "retry-after"})
_DECISIONS_KEPT = 10_000
# why: orjson reads JSON nested up to 1024 levels but writes only up to 254; a caller's message is refused well below
# either, so whatever the gateway accepted it can write again (upstream, into records, into its own errors).
_MAX_DEPTH = 64
_RESUME_HEADER = b"last-event-id"


def mcp_resources(settings: McpSettings, base_url: str) -> tuple[str, ...]:
    """The resource identifier (and token audience) of each MCP server the gateway serves."""
    return tuple(f"{base_url}{MCP_PREFIX}{s.name}" for s in settings.servers)


@dataclass(frozen=True, slots=True)
class _Server:
    config: McpServerConfig
    resource: str  # `{gateway}/mcp/{name}`
    metadata_url: str
    static_token: str | None

    @property
    def minted(self) -> bool:
        return self.config.auth == "minted"


@dataclass(slots=True)
class _Call:
    """A controlled call: what was decided about it."""

    tool: str  # `server/name` as the policy sees it
    name: str  # what the scope names: the tool, `resource:URI` or `prompt:NAME`
    action_class: str
    data_class: str
    decision: Decision
    arguments_sha256: str | None


@dataclass(frozen=True, slots=True)
class _Viewer:
    """Whom a list answer is filtered for: the caller, on this request, with the data class its calls would get."""

    server: _Server
    caller: Caller
    facts: RequestFacts
    data_class: str


class _Refusal(Exception):
    def __init__(self, status: int, code: int, message: str, data: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.data = dict(data)


class McpGateway:
    """The `/mcp/{server}` endpoints and their RFC 9728 metadata."""

    def __init__(
        self,
        settings: McpSettings,
        *,
        base_url: str,
        gate: Gate,
        authorizer: Authorizer,
        admission: Admission,
        minter: TokenMinter,
        audit: AuditWriter,
        pins: PinStore,
        store: StateStore,
        sessions: SessionIds,
        authorization_servers: Iterable[str],
        reveal: Callable[[SecretRef], str],
        declared_class: Callable[[str], str | None] = lambda tool: None,
        policy_version: Callable[[], object] = lambda: None,
        max_body_bytes: int = 4 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        new_trace_flags: str = "00",
    ) -> None:
        """`declared_class`: a tool's action class in the policy's entity data, if it declares the tool;
        `policy_version`: changes whenever the authorizer's policies or entities do (decisions are cached per version);
        `new_trace_flags`: the upstream `traceparent`'s flags in a trace the gateway started: `01` when the gateway
        records its traces (an OTLP export), else `00`.
        """
        self._settings = settings
        self._base = base_url
        self._gate = gate
        self._authorizer = authorizer
        self._admission = admission
        self._minter = minter
        self._audit = audit
        self._pins = pins
        self._authorization_servers = list(authorization_servers)
        self._declared_class = declared_class
        self._policy_version = policy_version
        self._decisions: dict[tuple[Any, ...], Decision] = {}
        self._decisions_version: object = None
        self._max_body = max_body_bytes
        self._clock = clock
        self._new_trace_flags = new_trace_flags
        self._budgets = Budgets(settings.budgets, store, clock)
        self._sessions = sessions
        self._session: aiohttp.ClientSession | None = None
        self._servers: dict[str, _Server] = {}
        self._resources = frozenset(mcp_resources(settings, base_url))
        for config in settings.servers:
            static = reveal(config.auth.static) if isinstance(config.auth, StaticCredential) else None
            self._servers[config.name] = _Server(
                config,
                f"{base_url}{MCP_PREFIX}{config.name}",
                f"{base_url}{MCP_RESOURCE_METADATA_PREFIX}{config.name}",
                static,
            )

    # -- wiring --------------------------------------------------------------------------

    def methods(self, path: str) -> dict[str, Handler] | None:
        """The handlers for `path`, if it is one of this gateway's (None: not an MCP path)."""
        for prefix, handlers in (
            (MCP_PREFIX, self._server_methods),
            (MCP_RESOURCE_METADATA_PREFIX, self._metadata_methods),
        ):
            if path.startswith(prefix):
                server = self._servers.get(path[len(prefix) :])
                return None if server is None else handlers(server)
        return None

    def _server_methods(self, server: _Server) -> dict[str, Handler]:
        """The MCP endpoint of one server: JSON-RPC posts go through the checks, GET (SSE) and DELETE pass."""
        return {
            "POST": functools.partial(self._post, server),
            "GET": functools.partial(self._passthrough, server, method="GET"),
            "DELETE": functools.partial(self._passthrough, server, method="DELETE"),
        }

    def _metadata_methods(self, server: _Server) -> dict[str, Handler]:
        return {"GET": functools.partial(self._metadata, server)}

    async def start(self) -> None:
        if self._session is None and self._servers:
            # No cookies: a tool server's cookie must not follow one caller into another's call.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=True,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- RFC 9728 ------------------------------------------------------------------------

    async def _metadata(self, server: _Server, request: Request, send: Send) -> None:
        body = {
            "resource": server.resource,
            "authorization_servers": self._authorization_servers,
            "bearer_methods_supported": ["header"],
            "resource_name": f"idgate MCP gateway: {server.config.name}",
        }
        await send_bytes(send, 200, orjson.dumps(body), request.id, extra=[(b"cache-control", b"max-age=300")])

    # -- POST: one JSON-RPC message ------------------------------------------------------

    async def _post(self, server: _Server, request: Request, send: Send) -> None:
        facts = _facts(request)
        message: dict[str, Any] | None = None
        call: _Call | None = None
        listing: str | None = None
        try:
            facts.caller = await self._caller(server, request)
            message = _message(await _body(request, self._max_body))
            _check_no_resumption(request)
            _check_routing_headers(request, message)
            session = self._check_session(server, request, facts.caller)
            method = message.get("method")
            if method in LISTS:
                # why: an entry is shown only if its call would be allowed, decided with the class that call would get.
                listing = self._data_class(facts.caller, None, request)
            if method in CONTROLLED:  # a notification that names a tool call is decided all the same
                call = self._decide(server, str(method), message, facts, request)
                if not call.decision.allowed:
                    raise _refused(call, facts)
                # INVARIANT: the decision is committed before anything goes upstream.
                await self._audit.commit(
                    identity_record(facts, ended=False),
                    tool_decision_record(facts, call.tool, call.action_class, call.data_class, call.decision),
                )
            elif method == LISTEN:
                watched = [self._decide_read(server, uri, facts, request) for uri in _listened(message)]
                call = next((read for read in watched if not read.decision.allowed), None)
                if call is not None:
                    raise _refused(call, facts)
                # INVARIANT: the decision is committed before anything goes upstream. why: one listen may watch many
                # URIs, so it goes upstream as an uncontrolled method does (scope `mcp:subscriptions/listen`), with a
                # decision on record per URI.
                decisions = [
                    tool_decision_record(facts, r.tool, r.action_class, r.data_class, r.decision) for r in watched
                ]
                if decisions:
                    await self._audit.commit(*decisions)
                else:
                    self._audit.check()
            else:
                self._audit.check()
        except (_Refusal, IdgateError) as error:
            await self._stopped(send, facts, server, message, error, call)
            return
        await self._forward(server, request, send, facts, message, call, session, listing)

    def _decide(
        self, server: _Server, method: str, message: dict[str, Any], facts: RequestFacts, request: Request
    ) -> _Call:
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        caller = facts.caller
        assert caller is not None
        if method == "tools/call":
            name = params.get("name")
            if not isinstance(name, str) or not name:
                raise _Refusal(400, INVALID_REQUEST, "`params.name` must name a tool", {})
            scope_name, tool_id = name, f"{server.config.name}/{name}"
            action_class = self._class_of(server, name)
            arguments = params.get("arguments")
        elif method in _READS_URI:
            uri = params.get("uri")
            if not isinstance(uri, str) or not uri:
                raise _Refusal(400, INVALID_REQUEST, "`params.uri` must name a resource", {})
            return self._decide_read(server, uri, facts, request)
        elif method == "completion/complete":
            scope_name = _completed(params.get("ref"))
            # why: the partial value and the context's arguments go upstream, so they are classified as a prompt's
            # arguments are.
            arguments = {key: params[key] for key in ("argument", "context") if key in params} or None
            tool_id, action_class = f"{server.config.name}/{scope_name}", _READ
        else:
            prompt = params.get("name")
            if not isinstance(prompt, str) or not prompt:
                raise _Refusal(400, INVALID_REQUEST, "`params.name` must name a prompt", {})
            scope_name = _scoped("prompt", prompt)
            tool_id, action_class, arguments = f"{server.config.name}/{scope_name}", _READ, params.get("arguments")
        data_class = self._data_class(caller, arguments, request)
        decision = self._authorize(server, caller, tool_id, action_class, data_class)
        if decision.allowed and method == "tools/call" and self._pins.withheld(server.config.name, scope_name):
            decision = Decision(False, ("idgate:tool-changed",), "tool", ("the tool changed since it was approved",))
        return _Call(tool_id, scope_name, action_class, data_class, decision, arguments_digest(arguments))

    def _decide_read(self, server: _Server, uri: str, facts: RequestFacts, request: Request) -> _Call:
        """The decision on a `resources/read` of `uri` (and on what is decided as one: subscribing to it)."""
        caller = facts.caller
        assert caller is not None
        scope_name = _scoped("resource", uri)
        tool_id, data_class = f"{server.config.name}/{scope_name}", self._data_class(caller, None, request)
        decision = self._authorize(server, caller, tool_id, _READ, data_class)
        return _Call(tool_id, scope_name, _READ, data_class, decision, arguments_digest(None))

    def _class_of(self, server: _Server, tool: str) -> str:
        declared = self._declared_class(f"{server.config.name}/{tool}")
        if declared is not None:
            return declared
        return server.config.tools.get(tool, server.config.unknown_tool_class)

    def _authorize(self, server: _Server, caller: Caller, tool_id: str, action_class: str, data_class: str) -> Decision:
        if not server.minted and action_class != _READ:
            # Without a credential minted per call, the server cannot tell one caller from another:
            # only reads go through it.
            problem = f"server `{server.config.name}` has no per-call credential; only read tools are allowed"
            return Decision(False, ("idgate:static-credential-read-only",), "tool", (problem,))
        # A tool the entity data does not declare is not cached by the authorizer (its entity is built per
        # call, ~300 µs): decisions are pure, so they are cached here, per policy version, keyed on every
        # input they depend on; each use gets its own decision id.
        version = self._policy_version()
        if version is not self._decisions_version or len(self._decisions) > _DECISIONS_KEPT:
            self._decisions, self._decisions_version = {}, version
        subject, credential = caller.subject, caller.credential
        key = (
            tool_id,
            action_class,
            data_class,
            (subject.kind, subject.id, subject.tenant, subject.issuer, subject.groups),
            tuple((actor.kind, actor.id) for actor in caller.actors),
            credential.kind,
            credential.binding,
            credential.task,
        )
        known = self._decisions.get(key)
        if known is None:
            resource = Resource("tool", tool_id, attributes={"action": action_class, "tenant": "*"})
            known = self._authorizer.authorize(caller, "call_tool", resource, {"data_class": data_class})
            if known.reason != "error":
                self._decisions[key] = known
            return known
        return Decision(
            known.allowed,
            known.policies,
            known.reason,
            known.errors,
            revision=known.revision,
            denied_for=known.denied_for,
        )

    def _data_class(self, caller: Caller, arguments: Any, request: Request) -> str:
        texts: list[str] = []
        _strings(arguments, texts, 0)
        data_class, _ = self._admission.data_class(caller, {"input": texts}, request.header(DATA_CLASS_HEADER))
        return data_class

    # -- forwarding ----------------------------------------------------------------------

    async def _forward(
        self,
        server: _Server,
        request: Request,
        send: Send,
        facts: RequestFacts,
        message: dict[str, Any],
        call: _Call | None,
        session: str | None,
        listing: str | None,
    ) -> None:
        """`listing`: for a list request, the data class its entries are decided with."""
        caller = facts.caller
        assert caller is not None
        method = message.get("method")
        details: dict[str, Any] = {}
        if call is not None:
            details = {
                "server": server.config.name,
                "method": method,
                "action_class": call.action_class,
                "decision_id": call.decision.id,
                "arguments_sha256": call.arguments_sha256,
            }
            try:
                if method == "tools/call":
                    details["budget"] = await self._budgets.spend(caller, call.action_class != _READ)
            except BudgetExceeded as exceeded:
                data = {"limit": exceeded.limit, "allowed": exceeded.allowed, "request_id": facts.request_id}
                data["decision_id"] = call.decision.id
                await self._refuse(send, facts, message, _Refusal(429, BUDGET_EXCEEDED, str(exceeded), data), call)
                return
            except StoreUnavailable:
                # Budgets fail closed: a call that cannot be counted does not go upstream.
                text = "the tool-call budgets cannot be checked now; try again"
                data = {"code": "unavailable", "decision_id": call.decision.id}
                await self._refuse(send, facts, message, _Refusal(503, UPSTREAM_FAILED, text, data), call)
                return
            scope: tuple[str, ...] = (f"tool:{call.name}", f"action:{call.action_class}")
        else:
            scope = (f"mcp:{method}" if isinstance(method, str) else "mcp:message",)
        try:
            headers = self._upstream_headers(server, request, caller, scope, facts, details, session)
        except AuthenticationError as error:
            await self._unauthenticated(send, facts, server, message, error)
            return
        upstream_message = message
        if listing is not None and "id" in message:
            upstream_message = {**message, "id": _list_id(str(method), message["id"])}
        started = time.perf_counter()
        try:
            # why: a listen stream is quiet until a watched resource changes; the read timeout would cut it
            # (the caller leaving still ends it, as a GET stream).
            listens = method == LISTEN
            response = await self._open(server, "POST", headers, orjson.dumps(upstream_message), streaming=listens)
        except _Refusal as refusal:
            await self._refuse(send, facts, message, refusal, call, details)
            return
        details["upstream_status"] = response.status
        try:
            refused = _upstream_refusal(server, response.status)
            if refused is not None:
                await self._refuse(send, facts, message, refused, call, details)
                return
            lapsed = await self._gate.lapsed(caller, self._clock())  # the headers may have taken long
            if lapsed is not None:
                await self._unauthenticated(send, facts, server, message, lapsed, record=False)
                self._record_end(facts, call, details, "refused")
                return
            down_session = self._client_session(server, response, caller)
            if listing is not None:
                await self._relay_filtered(server, send, facts, message, response, down_session, listing)
                return
            facts.status = response.status
            completed = await self._relay(server, request, send, facts, response, message, down_session)
            details["upstream_ms"] = round((time.perf_counter() - started) * 1000, 3)
            if not completed:
                facts.error_code, facts.error = "client_disconnected", "the client went away before the answer ended"
            ok = completed and response.status < 400 and facts.error_code is None
            self._record_end(facts, call, details, "ok" if ok else "error")
        finally:
            response.release()

    def _upstream_headers(
        self,
        server: _Server,
        request: Request,
        caller: Caller,
        scope: tuple[str, ...],
        facts: RequestFacts,
        details: dict[str, Any],
        session: str | None,
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in request.scope["headers"]:
            name = key.lower()
            if name in _UP_HEADERS or name.startswith(_UP_PREFIX):
                headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        headers["traceparent"] = upstream_traceparent(facts, self._new_trace_flags)
        details["upstream_span"] = facts.upstream_span
        # The session id the client holds is bound to it; the upstream gets back the one it issued.
        headers.pop("mcp-session-id", None)
        if session is not None:
            headers["mcp-session-id"] = session
        if server.minted:
            now = self._clock()
            expires_at = int(now) + self._settings.token_ttl_seconds
            # Never longer than the caller's own credential: what it could do ends when that does.
            if math.isfinite(caller.credential.expires_at):
                expires_at = min(expires_at, math.floor(caller.credential.expires_at))
            if expires_at <= now:
                raise InvalidToken("the credential has expired")
            minted = self._minter.mint(
                Grant(
                    subject=caller.subject,
                    subject_issuer=caller.subject.issuer,
                    audiences=(server.config.token_audience,),
                    expires_at=expires_at,
                    scope=scope,
                    actors=caller.actors,
                    task=caller.credential.task,
                    claims={"request_id": facts.request_id, "client_id": "idgate"},
                )
            )
            headers["authorization"] = f"Bearer {minted.token}"
            details["credential_id"] = minted.claims["jti"]
            details["audience"] = server.config.token_audience
        elif server.static_token is not None:
            headers["authorization"] = f"Bearer {server.static_token}"
            details["credential_id"] = "static"
        return headers

    async def _open(
        self, server: _Server, method: str, headers: Mapping[str, str], body: bytes | None, *, streaming: bool
    ) -> aiohttp.ClientResponse:
        """Send the request upstream; an upstream that cannot be reached or is slow is a `_Refusal` (502/504)."""
        if self._session is None:
            raise _Refusal(503, UPSTREAM_FAILED, "the MCP gateway is not started", {"code": "unavailable"})
        limits = server.config.timeout
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=limits.connect, sock_read=None if streaming else limits.read
        )
        name = server.config.name
        try:
            # why: a stream has no read timeout (it may be quiet for hours), but its headers must come in time
            async with asyncio.timeout(limits.read if streaming else None):
                return await self._session.request(
                    method, server.config.url, headers=headers, data=body, timeout=timeout, allow_redirects=False
                )
        except TimeoutError:
            message = f"MCP server `{name}` did not answer within {limits.read:g} s"
            raise _Refusal(504, UPSTREAM_FAILED, message, {"code": "upstream_timeout"}) from None
        except aiohttp.ClientError as exc:
            message = f"MCP server `{name}` is unreachable ({type(exc).__name__})"
            raise _Refusal(502, UPSTREAM_FAILED, message, {"code": "upstream_error"}) from None

    async def _relay(
        self,
        server: _Server,
        request: Request,
        send: Send,
        facts: RequestFacts,
        response: aiohttp.ClientResponse,
        message: dict[str, Any] | None,
        session: str | None,
    ) -> bool:
        """Relay the answer as it comes: a JSON one as it came, an event stream event by event, each written anew
        (`_relayed_events`); False if the client left first."""

        def broken() -> bytes:
            # A stream that breaks off ends with an error event for the request it answers.
            if message is None or "id" not in message or not _is_sse(response):
                return b""
            code = facts.error_code or "upstream_error"
            rpc = UNAUTHENTICATED if code.startswith("credential_") else UPSTREAM_FAILED
            error = _rpc_error(message.get("id"), rpc, str(facts.error), {"code": code})
            return b"data: " + error + b"\n\n"

        caller = facts.caller
        assert caller is not None
        viewer = _Viewer(server, caller, facts, self._data_class(caller, None, request))
        if not _is_sse(response):
            try:
                body = await self._json_answer(server, response, message, viewer)
            except IdgateError as lapsed:  # `_forward` records the end
                await self._unauthenticated(send, facts, server, message, lapsed, record=False)
                return True
            return await _stream_down(request, send, facts, response, session, _once(body), broken)
        own = message.get("id", _NO_ID) if message is not None else _NO_ID
        events = self._relayed_events(response, viewer, broken, own)
        return await _stream_down(request, send, facts, response, session, events, broken)

    async def _json_answer(
        self, server: _Server, response: aiohttp.ClientResponse, message: dict[str, Any] | None, viewer: _Viewer
    ) -> bytes:
        """A POST's answer that is no event stream, as the caller gets it: read whole (`_read_whole`: in bounds, in
        time), the caller's credential asked again (why it lapsed is raised, for `_unauthenticated`), and its one
        message written as a stream's is (`_written`: a resource update only to who may read it). An answer to the
        request passes as it came; an empty body stays empty; what cannot be read or is refused becomes a JSON-RPC
        error for the request, named in `facts`.

        why read whole: relayed as it came, a server could send a notification (or anything) as the body, and a
        client dispatches whatever it reads; and an answer must not go to a caller whose credential lapsed."""
        facts = viewer.facts
        rpc_id = message.get("id") if message is not None else None
        what = str(message.get("method")) if message is not None else "POST"
        try:
            raw = await self._read_whole(server, response, what)
        except _Refusal as refusal:
            facts.error_code = str(refusal.data.get("code") or "upstream_error")
            facts.error = refusal.message
            return _rpc_error(rpc_id, refusal.code, refusal.message, {"code": facts.error_code})
        assert viewer.caller is facts.caller
        lapsed = await self._gate.lapsed(viewer.caller, self._clock())
        if lapsed is not None:
            raise lapsed  # why: the answer came; the caller's credential went meanwhile
        if not raw.strip() or response.status in (202, 204):
            return raw  # nothing to answer with (a notification's or a response's acceptance): clients ignore it
        try:
            parsed, strict = _read_json(raw)
        except ValueError:
            parsed, strict = None, True
        name = server.config.name
        if isinstance(parsed, dict) and _is_answer(parsed):
            if (rpc_id is not None and _same_id(parsed.get("id"), rpc_id)) or parsed.get("id") is None:
                return raw  # the answer itself (or an error to a request the server could not read): as it came
            # why: a client takes an answer by its id; one under another request's id would stand in for it
            text = f"MCP server `{name}` answered {what} with the answer to another request"
        elif isinstance(parsed, dict):
            written = self._written(parsed, viewer, strict)
            if written is not None:
                return written
            text = f"MCP server `{name}` answered {what} with a message this caller may not have"
        elif response.status >= 400:
            return raw  # an error status's body, not JSON-RPC: the status says it
        else:
            text = f"MCP server `{name}` answered {what} with a body that is not JSON-RPC"
        facts.error_code, facts.error = "upstream_error", text
        return _rpc_error(rpc_id, UPSTREAM_FAILED, text, {"code": facts.error_code})

    async def _relay_filtered(
        self,
        server: _Server,
        send: Send,
        facts: RequestFacts,
        message: dict[str, Any],
        response: aiohttp.ClientResponse,
        session: str | None,
        data_class: str,
    ) -> None:
        """A list answer (`LISTS`), read whole, with only the entries this caller may use.

        Nothing of it is relayed as it came: the answer is parsed and written anew. An answer that
        cannot be parsed, or that is not this request's result with its list (or an error), is a
        502: a list that was not filtered (and, for tools, pinned) never reaches the caller."""
        name = server.config.name
        method = str(message.get("method"))
        if response.status != 200:
            if response.status == 404:
                text = f"MCP server `{name}` does not know this session"
                refusal = _Refusal(404, INVALID_REQUEST, text, {"code": "session_not_found"})
            else:
                text = f"MCP server `{name}` answered {method} with HTTP {response.status}"
                refusal = _Refusal(502, UPSTREAM_FAILED, text, {"code": "upstream_error"})
            await self._refuse(send, facts, message, refusal, None)
            return
        try:
            raw = await self._read_whole(server, response, method)
        except _Refusal as refusal:
            await self._refuse(send, facts, message, refusal, None)
            return
        caller = facts.caller
        assert caller is not None
        lapsed = await self._gate.lapsed(caller, self._clock())  # the answer came; did the caller's credential go?
        if lapsed is not None:
            await self._unauthenticated(send, facts, server, message, lapsed)
            return
        original = message.get("id")
        # why: the answer names the id the request went upstream with (`_list_id`); the caller gets back its own.
        expected = _list_id(method, original) if "id" in message else None
        sse = _is_sse(response)
        viewer = _Viewer(server, caller, facts, data_class)
        text = f"MCP server `{name}` sent a {method} answer that is not a JSON-RPC answer to it"
        try:
            if sse:
                body = self._filter_sse(raw, method, expected, original, viewer)
            else:
                body = self._filter_json(raw, method, expected, original, viewer)
        except orjson.JSONEncodeError as exc:
            # why: orjson reads deeper nesting than it writes; what cannot be written anew is not relayed as it came.
            body, text = None, f"MCP server `{name}` sent a {method} answer the gateway cannot write anew ({exc})"
        if body is None:
            await self._refuse(
                send, facts, message, _Refusal(502, UPSTREAM_FAILED, text, {"code": "upstream_error"}), None
            )
            return
        facts.status = 200
        self._audit_quietly(identity_record(facts, ended=True))
        extra = [
            h
            for h in _down_headers(response, "", session)
            if h[0] not in (b"content-type", b"x-request-id", b"cache-control")
        ]
        extra.append((b"cache-control", b"private"))
        content_type = b"text/event-stream" if sse else b"application/json"
        await send_bytes(send, 200, body, facts.request_id, content_type=content_type, extra=extra)

    async def _read_whole(self, server: _Server, response: aiohttp.ClientResponse, what: str) -> bytes:
        """The answer's body, at most `max_response_bytes`, whole within `timeout.read`; a `_Refusal` if it is longer
        or breaks off (502), or takes longer (504: a server trickling bytes would otherwise hold the call open)."""
        limit = self._settings.max_response_bytes
        seconds = server.config.timeout.read
        raw = bytearray()
        try:
            async with asyncio.timeout(seconds):
                async for chunk in response.content.iter_any():
                    raw += chunk
                    if len(raw) > limit:
                        text = (
                            f"MCP server `{server.config.name}` answered {what} with more than"
                            f" mcp.max_response_bytes ({limit} bytes)"
                        )
                        raise _Refusal(502, UPSTREAM_FAILED, text, {"code": "upstream_error"})
        except TimeoutError:
            text = f"MCP server `{server.config.name}` did not finish its {what} answer within {seconds:g} s"
            raise _Refusal(504, UPSTREAM_FAILED, text, {"code": "upstream_timeout"}) from None
        except aiohttp.ClientError as exc:
            text = f"MCP server `{server.config.name}` broke off its {what} answer ({type(exc).__name__})"
            raise _Refusal(502, UPSTREAM_FAILED, text, {}) from None
        return bytes(raw)

    def _filter_json(self, raw: bytes, method: str, expected: Any, original: Any, viewer: _Viewer) -> bytes | None:
        """The filtered answer, written anew; None if `raw` is not the answer to request `expected`."""
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not _is_list_answer(answer, expected, LISTS[method]):
            return None
        self._filter_answer(answer, method, viewer)
        answer["id"] = original
        return orjson.dumps(answer)

    def _filter_sse(self, raw: bytes, method: str, expected: Any, original: Any, viewer: _Viewer) -> bytes | None:
        """The event stream written anew: each event whose data is a JSON-RPC message, the answer to
        request `expected` filtered. Events whose data does not parse, and other requests' answers, are
        dropped; None if no event carries the answer."""
        out: list[bytes] = []
        answered = False
        text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # SSE ends lines with CRLF, LF or CR
        for block in text.split(b"\n\n"):
            event = _sse_event(block)
            if event.data is None:
                continue
            try:
                parsed = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(parsed, dict):
                continue
            if not _is_answer(parsed):
                # why: the server's notifications on this stream pass as on any stream (a resource update only to a
                # caller who may read the resource)
                rewritten = self._rewritten(parsed, viewer)
                if rewritten is not None:
                    out.append(event.written(orjson.dumps(rewritten)))
                continue
            if _is_answer(parsed):
                # An answer: this request's, filtered; another request's has no business here.
                if not _same_id(parsed.get("id"), expected):
                    continue
                if not _is_list_answer(parsed, expected, LISTS[method]):
                    return None
                self._filter_answer(parsed, method, viewer)
                parsed["id"] = original
                answered = True
            out.append(event.written(orjson.dumps(parsed)))
        return b"".join(out) if answered else None

    def _filter_answer(self, answer: dict[str, Any], method: str, viewer: _Viewer) -> None:
        """Keep in a list answer only the entries the caller may use; one `list_filtered` record says how many."""
        result = answer.get("result")
        key = LISTS[method]
        entries = result.get(key) if isinstance(result, dict) else None
        if not isinstance(entries, list):
            return  # an error answer
        assert isinstance(result, dict)
        kept = [entry for entry in entries if self._may_see(entry, method, viewer)]
        result[key] = kept
        if "cacheScope" in result:
            # The list is this caller's now: no shared cache may serve it to another (2026-07-28 cache hints).
            result["cacheScope"] = "private"
        # why: one record per listing, not one decision record per entry: a list of 500 is one occasion.
        self._audit_quietly(
            list_record(
                viewer.facts,
                viewer.caller,
                viewer.server.config.name,
                method,
                "ok",
                len(entries),
                len(entries) - len(kept),
            )
        )

    def _may_see(self, entry: Any, method: str, viewer: _Viewer) -> bool:
        """Whether the caller may see one list entry: only if it may make the call the entry names.

        A tool: `tools/call` on it (and it is not withheld as changed; a first listing pins it). A
        resource: `resources/read` on its `uri`; a resource template: `resources/read` on its
        `uriTemplate` itself (a grant naming the template, or the server's `*`: a template's expansions
        cannot be known, and a grant of some of them does not show it). A prompt: `prompts/get`. Each
        through `_authorize`, as `_decide` does for the call, with the listing's data class; no record
        per entry. An entry without its name or URI is dropped."""
        if not isinstance(entry, dict):
            return False
        server, caller, facts = viewer.server, viewer.caller, viewer.facts
        name = server.config.name
        if method == "tools/list":
            tool_name = entry.get("name")
            if not isinstance(tool_name, str):
                return False
            digest = tool_hash(entry)
            verdict = self._pins.check(name, tool_name, digest)
            if verdict != "approved":
                self._audit_quietly(pin_record(facts, caller, f"{name}/{tool_name}", verdict == "changed", digest))
            if self._pins.withheld(name, tool_name):
                return False
            action_class = self._class_of(server, tool_name)
            return self._authorize(server, caller, f"{name}/{tool_name}", action_class, viewer.data_class).allowed
        if method == "prompts/list":
            kind, field = "prompt", "name"
        else:
            kind, field = "resource", "uri" if method == "resources/list" else "uriTemplate"
        value = entry.get(field)
        if not isinstance(value, str) or not value:
            return False
        tool_id = f"{name}/{_scoped(kind, value)}"
        return self._authorize(server, caller, tool_id, _READ, viewer.data_class).allowed

    # -- GET and DELETE ------------------------------------------------------------------

    async def _passthrough(self, server: _Server, request: Request, send: Send, method: str) -> None:
        facts = _facts(request)
        try:
            caller = facts.caller = await self._caller(server, request)
            _check_no_resumption(request)
            _check_no_routing_headers(request)
            session = self._check_session(server, request, caller)
            # why: a list answer replayed on this stream is filtered as on the POST that asked for it.
            data_class = self._data_class(caller, None, request)
            self._audit.check()
            headers = self._upstream_headers(server, request, caller, (f"mcp:{method}",), facts, {}, session)
            response = await self._open(server, method, headers, None, streaming=method == "GET")
        except (_Refusal, IdgateError) as error:
            await self._stopped(send, facts, server, None, error, None)
            return
        try:
            refused = _upstream_refusal(server, response.status)
            if refused is not None:
                await self._refuse(send, facts, None, refused, None)
                return
            lapsed = await self._gate.lapsed(caller, self._clock())
            if lapsed is not None:
                await self._unauthenticated(send, facts, server, None, lapsed)
                return
            down_session = self._client_session(server, response, caller)
            if _is_sse(response):
                facts.status = response.status
                completed = await self._relay_events(server, request, send, facts, response, down_session, data_class)
                if not completed:
                    facts.error_code, facts.error = "client_disconnected", "the client closed the stream"
            else:
                try:
                    await self._relay_one(server, send, facts, response, down_session, data_class, method)
                except _Refusal as refusal:
                    await self._refuse(send, facts, None, refusal, None)
                    return
                except IdgateError as gone:  # the caller's credential went while the answer came
                    await self._unauthenticated(send, facts, server, None, gone, record=False)
            self._audit_quietly(identity_record(facts, ended=True))
        finally:
            response.release()

    def _rewritten(self, message: dict[str, Any], viewer: _Viewer, answers: Any = _NO_ID) -> dict[str, Any] | None:
        """One JSON-RPC message of a GET or DELETE answer, as the caller gets it.

        The server's requests and notifications pass. An answer under a list id (`_list_id`) is the
        answer to a list request, replayed: filtered as on its POST and given back the caller's id;
        one that is not a list answer becomes a JSON-RPC error for that id (and a record). Any other
        answer is to a request that was no list (every list request goes upstream under a list id). A
        `notifications/resources/updated` passes only if the caller may read its `uri` (`_may_read`); else it is
        dropped (None, and a warning)."""
        method = message.get("method")
        if isinstance(method, str) and method.lower() == RESOURCE_UPDATED:  # why: any spelling a client might take
            return message if self._may_read(message, viewer) else None
        if isinstance(method, str) and method.lower() == SUBSCRIPTIONS_ACKNOWLEDGED:
            self._acknowledged_readable(message, viewer)
            return message
        if not _is_answer(message):
            return message
        listed = _listed_as(message.get("id"))
        if listed is None:
            # why: a client takes an answer by its id; one under another request's id (a pending list's, say: the
            # server knows the caller's ids) would stand in for that request's answer, unfiltered. Only the answer
            # to the request this stream answers (`answers`; none on a GET's stream) passes.
            return message if _same_id(message.get("id"), answers) else None
        method, original = listed
        if not _is_list_answer(message, message["id"], LISTS[method]):
            self._audit_quietly(
                list_record(viewer.facts, viewer.caller, viewer.server.config.name, method, "error", 0, 0)
            )
            text = f"MCP server `{viewer.server.config.name}` sent a {method} answer that is not one"
            data = {"code": "upstream_error", "request_id": viewer.facts.request_id}
            return {"jsonrpc": "2.0", "id": original, "error": {"code": UPSTREAM_FAILED, "message": text, "data": data}}
        self._filter_answer(message, method, viewer)
        message["id"] = original
        return message

    async def _relay_events(
        self,
        server: _Server,
        request: Request,
        send: Send,
        facts: RequestFacts,
        response: aiohttp.ClientResponse,
        session: str | None,
        data_class: str,
    ) -> bool:
        """A GET's event stream, relayed event by event, each written anew (`_relayed_events`); False if the
        client left first. Nothing of it is relayed as it came."""
        caller = facts.caller
        assert caller is not None
        viewer = _Viewer(server, caller, facts, data_class)
        events = self._relayed_events(response, viewer, lambda: b"")
        return await _stream_down(request, send, facts, response, session, events, lambda: b"")

    async def _relayed_events(
        self, response: aiohttp.ClientResponse, viewer: _Viewer, broken: Callable[[], bytes], answers: Any = _NO_ID
    ) -> AsyncIterator[bytes]:
        """An event stream (a GET's, or a POST's answer) cut into events (`_EventSplitter`), each written anew
        (`_rewritten_event`).

        Before the events a read completes are relayed, the caller's credential is checked again (`Gate.lapsed`): one
        expired, revoked or otherwise dead since the request came ends the stream there, nothing more relayed, the
        upstream answer closed, and why in `facts` (the request's closing record). An event over
        `max_response_bytes` ends it too, with `broken()` last (a POST's error for its request)."""
        facts, caller = viewer.facts, viewer.caller
        limit = self._settings.max_response_bytes
        events = _EventSplitter()
        content = response.content
        while True:
            try:
                # why: a quiet stream is asked again too, so a dead credential does not keep its stream (and the
                # upstream's subscription) open until the next event
                async with asyncio.timeout(RECHECK_SECONDS) as tick:
                    chunk = await content.readany()
            except TimeoutError:
                if not tick.expired():
                    raise  # the upstream's own read timeout (aiohttp raises it again on every read): broken off
                chunk = None
            if chunk == b"":
                return  # the stream ended
            blocks = events.feed(chunk) if chunk is not None else []
            if events.pending > limit:
                facts.error_code, facts.error = "upstream_error", f"an event is over {limit} bytes"
                tail = broken()
                if tail:
                    yield tail
                return
            if not blocks and chunk is not None:
                continue
            lapsed = await self._gate.lapsed(caller, self._clock())
            if lapsed is not None:
                facts.error_code, facts.error = lapsed.code, lapsed.message
                response.close()
                tail = broken()  # a POST's stream ends with an error for its request, naming why
                if tail:
                    yield tail
                return
            out = b"".join(self._rewritten_event(block, viewer, answers) for block in blocks)
            if out:
                yield out

    def _rewritten_event(self, block: bytes, viewer: _Viewer, answers: Any = _NO_ID) -> bytes:
        """One event of a GET's stream written anew: a message as `_rewritten` makes it; an event with empty
        data (a resumption cursor) or none (only an id, or a keep-alive comment) without content; an event
        whose data is not a JSON object, dropped."""
        event = _sse_event(block)
        if event.data is None:
            return event.written(None) if event.id is not None or event.retry is not None else b":\n\n"
        if not event.data:
            return event.written(b"")
        try:
            parsed, strict = _read_json(event.data)
        except ValueError:
            return b""
        if not isinstance(parsed, dict):
            return b""
        written = self._written(parsed, viewer, strict, answers)
        return b"" if written is None else event.written(written)

    def _may_read(self, notification: dict[str, Any], viewer: _Viewer) -> bool:
        """Whether the caller may be told that the resource a `notifications/resources/updated` names changed: only
        if it may read it, decided by `_authorize` as a `resources/list` entry is (`_may_see`), with no record. One
        without a `uri` string may not; one it may not is logged (a warning: server and request id), not recorded."""
        params = notification.get("params")
        uri = params.get("uri") if isinstance(params, dict) else None
        if self._readable(uri, viewer):
            return True
        log.warning(
            "dropped a %s from MCP server %s (request %s): the caller may not read the resource it names",
            RESOURCE_UPDATED,
            viewer.server.config.name,
            viewer.facts.request_id,
        )
        return False

    def _readable(self, uri: object, viewer: _Viewer) -> bool:
        """Whether the caller may read resource `uri` (a non-empty string), decided as a `resources/list` entry is."""
        if not isinstance(uri, str) or not uri:
            return False
        tool_id = f"{viewer.server.config.name}/{_scoped('resource', uri)}"
        return self._authorize(viewer.server, viewer.caller, tool_id, _READ, viewer.data_class).allowed

    def _acknowledged_readable(self, notification: dict[str, Any], viewer: _Viewer) -> None:
        """A `notifications/subscriptions/acknowledged` keeps in `params.notifications.resourceSubscriptions` only
        the URIs the caller may read (the listen was decided on those; a server may name others)."""
        params = notification.get("params")
        watched = params.get("notifications") if isinstance(params, dict) else None
        uris = watched.get("resourceSubscriptions") if isinstance(watched, dict) else None
        if isinstance(watched, dict) and "resourceSubscriptions" in watched:
            kept = [uri for uri in uris if self._readable(uri, viewer)] if isinstance(uris, list) else []
            watched["resourceSubscriptions"] = kept

    def _written(
        self, message: dict[str, Any], viewer: _Viewer, strict: bool = True, answers: Any = _NO_ID
    ) -> bytes | None:
        """A stream's or a GET's or DELETE's message as `_rewritten` makes it, encoded (`_write_json`); None if
        `_rewritten` drops it, or (and a warning) if it cannot be written anew (nested too deeply): the stream goes
        on."""
        try:
            rewritten = self._rewritten(message, viewer, answers)
            return None if rewritten is None else _write_json(rewritten, strict)
        except (orjson.JSONEncodeError, ValueError, RecursionError) as exc:
            server, request_id = viewer.server.config.name, viewer.facts.request_id
            log.warning(
                "dropped a message from MCP server %s (request %s) that cannot be written: %s", server, request_id, exc
            )
            return None

    async def _relay_one(
        self,
        server: _Server,
        send: Send,
        facts: RequestFacts,
        response: aiohttp.ClientResponse,
        session: str | None,
        data_class: str,
        method: str,
    ) -> None:
        """A GET or DELETE answer that is no event stream: read whole, its one message written anew.

        An empty body stays empty; a body that is not a JSON object, or cannot be written anew, is a 502 on
        success and dropped (the status kept) on an error status."""
        caller = facts.caller
        assert caller is not None
        raw = await self._read_whole(server, response, method)
        lapsed = await self._gate.lapsed(caller, self._clock())
        if lapsed is not None:
            raise lapsed  # `_passthrough` answers it (`_unauthenticated`)
        body = b""
        if raw.strip():
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            viewer = _Viewer(server, caller, facts, data_class)
            written = self._written(parsed, viewer) if isinstance(parsed, dict) else None
            if written is not None:
                body = written
            elif response.status < 400:
                text = f"MCP server `{server.config.name}` answered {method} with a body that is not JSON-RPC"
                raise _Refusal(502, UPSTREAM_FAILED, text, {"code": "upstream_error"})
        facts.status = response.status
        extra = [h for h in _down_headers(response, "", session) if h[0] not in (b"content-type", b"x-request-id")]
        await send_bytes(
            send, response.status, body, facts.request_id, content_type=_content_type(response), extra=extra
        )

    # -- identity and sessions -----------------------------------------------------------

    async def _caller(self, server: _Server, request: Request) -> Caller:
        caller = await self._gate.caller(request)
        # Its issuer accepted the audience. A token narrowed to MCP servers (RFC 8707 `resource`)
        # is for those only; one for the gateway as a whole is good at every MCP endpoint.
        audiences = _token_audiences(request.header(b"authorization"))
        if server.resource not in audiences and not self._resources.isdisjoint(audiences):
            raise InvalidToken(f"token audience is another MCP server; expected `{server.resource}`")
        return caller

    def _check_session(self, server: _Server, request: Request, caller: Caller) -> str | None:
        """The upstream session id in the request's `Mcp-Session-Id`, if it was given to this caller.

        A session started by one subject is not usable by another (see `sessions.py`): an id this
        caller was not given, forged or unknown, is refused as a session the server does not know."""
        client_id = request.header(b"mcp-session-id")
        if client_id is None:
            return None
        upstream_id = self._sessions.unwrap(server.config.name, caller, client_id.decode("latin-1"))
        if upstream_id is None:
            raise _Refusal(404, INVALID_REQUEST, "no such session for this caller", {"code": "session_not_found"})
        return upstream_id

    def _client_session(self, server: _Server, response: aiohttp.ClientResponse, caller: Caller) -> str | None:
        """The `Mcp-Session-Id` the client is given for the one the upstream named (None: it named none)."""
        upstream_id = response.headers.get("mcp-session-id")
        return None if upstream_id is None else self._sessions.wrap(server.config.name, caller, upstream_id)

    # -- endings -------------------------------------------------------------------------

    def _record_end(self, facts: RequestFacts, call: _Call | None, details: dict[str, Any], outcome: str) -> None:
        if call is None:
            self._audit_quietly(identity_record(facts, ended=True))
            return
        details["status"] = facts.status
        if facts.error_code is not None:
            details["error"] = {"code": facts.error_code, "message": facts.error}
        self._audit_quietly(tool_call_record(facts, call.tool, outcome, details))

    async def _stopped(
        self,
        send: Send,
        facts: RequestFacts,
        server: _Server,
        message: dict[str, Any] | None,
        error: _Refusal | IdgateError,
        call: _Call | None,
    ) -> None:
        """Answer a request stopped before it went upstream: refused by a check, unauthenticated, or failed."""
        if isinstance(error, _Refusal):
            await self._refuse(send, facts, message, error, call)
        elif isinstance(error, AuthenticationError):
            await self._unauthenticated(send, facts, server, message, error)
        else:
            failed = _Refusal(error.status, _code_of(error), error.message, {"code": error.code})
            await self._refuse(send, facts, message, failed, None)

    async def _refuse(
        self,
        send: Send,
        facts: RequestFacts,
        message: dict[str, Any] | None,
        refusal: _Refusal,
        call: _Call | None,
        details: dict[str, Any] | None = None,
    ) -> None:
        facts.status = refusal.status
        facts.error_code = str(refusal.data.get("code") or _error_code(refusal))
        facts.error = refusal.message
        data = {"request_id": facts.request_id, **refusal.data}
        if call is not None:
            data.setdefault("decision_id", call.decision.id)
            if not call.decision.allowed:
                # The refused call's decision was not committed before: it goes on record now.
                self._audit_quietly(identity_record(facts, ended=False))
                self._audit_quietly(
                    tool_decision_record(facts, call.tool, call.action_class, call.data_class, call.decision)
                )
            record = dict(details or {})
            record.update({"decision_id": call.decision.id, "arguments_sha256": call.arguments_sha256})
            record["error"] = {"code": facts.error_code, "message": refusal.message}
            record["status"] = refusal.status
            outcome = "refused" if refusal.status < 500 else "error"
            self._audit_quietly(tool_call_record(facts, call.tool, outcome, record))
        else:
            self._audit_quietly(identity_record(facts, ended=True))
        rpc_id = message.get("id") if message is not None else None
        body = _rpc_error(rpc_id, refusal.code, refusal.message, data)
        await send_bytes(send, refusal.status, body, facts.request_id)

    async def _unauthenticated(
        self,
        send: Send,
        facts: RequestFacts,
        server: _Server,
        message: dict[str, Any] | None,
        error: IdgateError,
        *,
        record: bool = True,
    ) -> None:
        """A caller refused for who it is, when it came or since (its credential lapsed while the answer came): a
        401 with this server's `WWW-Authenticate`, or the 503 of a liveness that cannot be known. On record as the
        request's end, unless `record` is False (the caller records the end itself)."""
        facts.status, facts.error_code, facts.error = error.status, error.code, error.message
        if record:
            self._audit_quietly(identity_record(facts, ended=True))
        rpc_id = message.get("id") if message is not None else None
        extra: list[tuple[bytes, bytes]] = []
        if isinstance(error, AuthenticationError):
            # Point MCP clients to this server's own metadata, whatever the gate named.
            error.resource_metadata = server.metadata_url
            extra.append((b"www-authenticate", _challenge(error)))
        code = UNAUTHENTICATED if isinstance(error, AuthenticationError) else _code_of(error)
        body = _rpc_error(rpc_id, code, error.message, {"code": error.code, "request_id": facts.request_id})
        await send_bytes(send, error.status, body, facts.request_id, extra=extra)

    def _audit_quietly(self, record: dict[str, Any]) -> None:
        with contextlib.suppress(IdgateError):
            self._audit.emit(record)


# -- helpers -------------------------------------------------------------------------------


def _check_routing_headers(request: Request, message: Mapping[str, Any]) -> None:
    """The routing headers (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`, MCP 2026-07-28) must say what the body says.

    The gateway decides on the body; a tool server, or a load balancer in front of it, may act on the
    headers. So each one relayed must be a copy of the body, on every message, not only on the calls
    that are decided: `Mcp-Method` the body's method; `Mcp-Name` the name a naming method carries
    (`_NAMED_BY`), and on no other method; `Mcp-Param-X` the `tools/call` argument it mirrors (see
    `_check_param`), and on no other method. None may come twice. Anything else is a 400, before
    anything goes upstream."""
    method = message.get("method")
    raw_params = message.get("params")
    params: Mapping[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    seen: set[bytes] = set()
    for key, raw in request.scope["headers"]:
        header = key.lower()
        if header not in (_METHOD_HEADER, _NAME_HEADER) and not header.startswith(_UP_PREFIX):
            continue
        shown_header = _shown_header(header)
        # why: one copy is checked and one relayed; with two, a reader taking the other would see another value.
        if header in seen:
            raise _mismatch(f"the `{shown_header}` header is sent more than once")
        seen.add(header)
        value = raw.decode("latin-1")
        if header == _METHOD_HEADER:
            if value != method:
                raise _mismatch("the `Mcp-Method` header does not match the body's method")
        elif header == _NAME_HEADER:
            field = _NAMED_BY.get(method) if isinstance(method, str) else None
            if field is None:
                raise _mismatch(f"the `Mcp-Name` header is only for {', '.join(_NAMED_BY)}")
            named = params.get(field)
            if not isinstance(named, str) or _header_value(value) != named:
                raise _mismatch(f"the `Mcp-Name` header does not match the body's `params.{field}`")
        else:
            if method != "tools/call":
                raise _mismatch(f"`{shown_header}` headers are only for tools/call")
            _check_param(shown_header, header[len(_UP_PREFIX) :].decode("latin-1"), value, params.get("arguments"))


def _check_param(shown_header: str, token: str, value: str, arguments: Any) -> None:
    """An `Mcp-Param-X` header must be a copy of the `tools/call` argument it names.

    The spec names the header after the `x-mcp-header` annotation in the tool's input schema, which
    the gateway does not hold at call time; so it takes the header to mirror the top-level argument
    whose name is X (header names know no case), and accepts it only if exactly one argument has that
    name and the header holds its value as the spec renders it (`_rendered`), verbatim or in the
    `=?base64?...?=` form. A header for an argument that is absent, nested, ambiguous or not a string,
    integer or boolean cannot be checked, and is refused: a tool whose annotation names another header
    than its argument cannot be called with the header through the gateway."""
    named = [name for name in arguments if name.lower() == token] if isinstance(arguments, dict) else []
    if len(named) != 1:
        raise _mismatch(f"the `{shown_header}` header names no argument of this call")
    assert isinstance(arguments, dict)
    rendered = _rendered(arguments[named[0]])
    if rendered is None:
        raise _mismatch(f"the `{shown_header}` header can mirror only a string, integer or boolean argument")
    if _header_value(value) != rendered:
        raise _mismatch(f"the `{shown_header}` header does not match the body's argument `{shown(named[0])}`")


def _rendered(argument: Any) -> str | None:
    """An argument as an `Mcp-Param-*` header carries it (before encoding): None if it has no such form.

    The spec allows the annotation on string, integer and boolean properties only (never `number`:
    float formatting differs between implementations)."""
    if isinstance(argument, bool):
        return "true" if argument else "false"
    if isinstance(argument, str):
        return argument
    if isinstance(argument, int):
        return str(argument)
    return None


def _check_no_routing_headers(request: Request) -> None:
    """A GET or DELETE carries no JSON-RPC message: a routing header on one names something nothing was decided on."""
    for key, _ in request.scope["headers"]:
        header = key.lower()
        if header in (_METHOD_HEADER, _NAME_HEADER) or header.startswith(_UP_PREFIX):
            raise _mismatch(f"the `{_shown_header(header)}` header is only for a POST of the message it names")


def _mismatch(message: str) -> _Refusal:
    return _Refusal(400, HEADER_MISMATCH, message, {"code": "header_mismatch"})


def _shown_header(header: bytes) -> str:
    """A header name as a message shows it: `Mcp-Param-Region` for `mcp-param-region`, bounded."""
    name = "-".join(part.capitalize() for part in header.decode("latin-1").split("-"))
    return shown(name)


def _header_value(value: str) -> str | None:
    """A header value as the MCP SDKs encode it: verbatim, or `=?base64?...?=` (UTF-8, canonical base64)
    for anything not plain ASCII; None for a malformed one, which then matches nothing."""
    if value.startswith("=?base64?") and value.endswith("?="):
        payload = value[9:-2]
        try:
            decoded = base64.b64decode(payload, validate=True)
        except binascii.Error:
            return None
        # why: `validate=True` lets non-canonical padding bits through; two spellings of one value could differ
        # to a proxy that compares the raw header.
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        try:
            return decoded.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


def _scoped(kind: str, name: str) -> str:
    """A resource's or prompt's name as policy and the minted scope see it: `resource:URI`, `prompt:NAME`
    (percent-encoded, so a tool id `SERVER/resource:URI` has no second slash)."""
    return f"{kind}:{quote(name, safe='')}"


def _completed(ref: Any) -> str:
    """The scoped name a `completion/complete` is decided on: its `ref`'s prompt (`ref/prompt`, as its
    `prompts/get`) or resource or template URI (`ref/resource`, as its `resources/read`); else a 400."""
    if isinstance(ref, dict):
        kind = ref.get("type")
        if kind == "ref/prompt" and isinstance(ref.get("name"), str) and ref["name"]:
            return _scoped("prompt", ref["name"])
        if kind == "ref/resource" and isinstance(ref.get("uri"), str) and ref["uri"]:
            return _scoped("resource", ref["uri"])
    message = "`params.ref` must be a `ref/prompt` with a `name` or a `ref/resource` with a `uri`"
    raise _Refusal(400, INVALID_PARAMS, message, {})


def _listened(message: Mapping[str, Any]) -> list[str]:
    """The resource URIs a `subscriptions/listen` watches (`params.notifications.resourceSubscriptions`, none if
    absent); a 400 if its params are not an object with a `notifications` filter, or the URIs not a list of them."""
    params = message.get("params")
    notifications = params.get("notifications") if isinstance(params, dict) else None
    uris = notifications.get("resourceSubscriptions") if isinstance(notifications, dict) else None
    if not isinstance(notifications, dict) or not (
        uris is None or (isinstance(uris, list) and all(isinstance(uri, str) and uri for uri in uris))
    ):
        message_ = "`params.notifications` must be a filter whose `resourceSubscriptions` is a list of resource URIs"
        raise _Refusal(400, INVALID_PARAMS, message_, {})
    return list(dict.fromkeys(uris or ()))


def _list_id(method: str, rpc_id: Any) -> str:
    """The id a list request goes upstream with: the method and the caller's own id (as JSON)."""
    return f"{_LIST_ID}{method}:{orjson.dumps(rpc_id).decode()}"


def _listed_as(rpc_id: Any) -> tuple[str, Any] | None:
    """The list method and the caller's own id behind an id of `_list_id`; None for any other id."""
    if not isinstance(rpc_id, str) or not rpc_id.startswith(_LIST_ID):
        return None
    method, _, raw = rpc_id[len(_LIST_ID) :].partition(":")
    if method not in LISTS:
        return None
    try:
        return method, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _is_answer(message: Mapping[str, Any]) -> bool:
    """A JSON-RPC answer (a result or an error), not a request or notification."""
    return "method" not in message and ("result" in message or "error" in message)


def _is_list_answer(answer: Any, rpc_id: Any, key: str) -> bool:
    """`answer` is the JSON-RPC answer to request `rpc_id`: a result holding a `key` list, or an error."""
    if not isinstance(answer, dict) or "id" not in answer or not _same_id(answer["id"], rpc_id):
        return False
    if "error" in answer:
        return "result" not in answer and isinstance(answer["error"], dict)
    result = answer.get("result")
    return isinstance(result, dict) and isinstance(result.get(key), list)


def _same_id(one: Any, other: Any) -> bool:
    """JSON-RPC ids compared as JSON values (`1` is not `true` nor `1.0`)."""
    return type(one) is type(other) and bool(one == other)


@dataclass(frozen=True, slots=True)
class _Event:
    """One server-sent event's fields; `data` None if it has no `data` line."""

    id: bytes | None
    type: bytes | None
    retry: bytes | None
    data: bytes | None

    def written(self, data: bytes | None) -> bytes:
        """The event written anew with `data` (None: no data line), LF line ends."""
        lines = [] if self.id is None else [b"id: " + self.id]
        if self.retry is not None:
            lines.append(b"retry: " + self.retry)
        if data is not None:
            if self.type is not None:
                lines.append(b"event: " + self.type)
            lines.append(b"data: " + data if data else b"data:")
        return b"\n".join(lines) + b"\n\n"


class _EventSplitter:
    """An event stream cut into events as its chunks come: line ends made LF, events ended by a blank line.

    Each byte is normalised once and searched for the end of an event about once, however the chunks fall
    (`scanned` counts them): an event in many small chunks costs what it costs in one."""

    def __init__(self) -> None:
        self._buffer = bytearray()  # the unfinished event, normalised (so no LF LF in it)
        self._held = b""  # a CR that ended the last chunk
        self.scanned = 0

    @property
    def pending(self) -> int:
        """The unfinished event's size in bytes (a held CR counted)."""
        return len(self._buffer) + len(self._held)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events `chunk` completes (their lines split on LF, without the blank line that ends them)."""
        # why: a CR at a chunk's end may be the first half of a CRLF; it waits for the next chunk.
        data = self._held + chunk
        self._held = b"\r" if data.endswith(b"\r") else b""
        data = data[: len(data) - len(self._held)]
        # why: the old bytes hold no LF LF; only the new ones are searched, and the last old one (an LF whose
        # pair may just have come).
        start, at = 0, max(len(self._buffer) - 1, 0)
        self._buffer += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self.scanned += len(data) + len(self._buffer) - at
        events: list[bytes] = []
        while (at := self._buffer.find(b"\n\n", at)) >= 0:
            events.append(bytes(self._buffer[start:at]))
            start = at = at + 2
        if start:
            del self._buffer[:start]
        return events


def _sse_event(block: bytes) -> _Event:
    """One server-sent event (lines already split on LF)."""
    event_id: bytes | None = None
    event_type: bytes | None = None
    retry: bytes | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            data.append(value)
        elif field == b"id" and b"\0" not in value:
            event_id = value
        elif field == b"event":
            event_type = value
        elif field == b"retry" and value.isdigit():
            retry = value
    return _Event(event_id, event_type, retry, b"\n".join(data) if data else None)


def _refused(call: _Call, facts: RequestFacts) -> _Refusal:
    decision = call.decision
    if decision.policies == ("idgate:tool-changed",):
        why = "withheld: it changed upstream since it was approved; re-approve it with `idgate mcp approve`"
    else:
        why = f"refused ({decision.reason})"
    data = {"decision_id": decision.id, "reason": decision.reason, "request_id": facts.request_id}
    return _Refusal(403, REFUSED, f"call to `{shown(call.tool)}` is {why}", data)


def _facts(request: Request) -> RequestFacts:
    facts = RequestFacts(request.id, request.method, request.path, action="call_tool")
    trace = trace_context(request.header(b"traceparent"))
    if trace is not None:
        facts.trace_id, facts.parent_span, facts.trace_flags = trace
    return facts


async def _body(request: Request, limit: int) -> bytes:
    try:
        return await request.body(limit)
    except PayloadTooLarge:
        raise
    except IdgateError as error:
        raise _Refusal(400, PARSE_ERROR, error.message, {}) from None


def _message(raw: bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Refusal(400, PARSE_ERROR, f"body is not valid JSON: {exc.msg}", {}) from None
    if isinstance(message, list):
        raise _Refusal(400, INVALID_REQUEST, "JSON-RPC batches are not supported; send one message per POST", {})
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise _Refusal(400, INVALID_REQUEST, "body must be one JSON-RPC 2.0 message", {})
    # why: opening brackets bound the depth from above; only a message with more than `_MAX_DEPTH` of them is walked.
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH and _too_deep(message):
        raise _Refusal(400, INVALID_REQUEST, f"the message is nested deeper than {_MAX_DEPTH} levels", {})
    rpc_id = message.get("id")
    if isinstance(rpc_id, str) and rpc_id.startswith(_LIST_ID):
        # why: the gateway tags its own list requests so (`_list_id`); a caller's id in that form would pass for one.
        raise _Refusal(400, INVALID_REQUEST, f"a request id may not begin with `{_LIST_ID}`", {})
    return message


def _too_deep(value: Any) -> bool:
    """Whether `value` has containers nested more than `_MAX_DEPTH` deep (the value itself is level 1)."""
    level: list[Any] = [value]
    for _ in range(_MAX_DEPTH):
        level = [
            item
            for container in level
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, (dict, list))
        ]
        if not level:
            return False
    return True


def _check_no_resumption(request: Request) -> None:
    """`Last-Event-ID` is refused: the upstream replays whatever stream an event id names, and the ids are not bound
    to the caller who was sent them, so another caller (or an agent on a shared session) could have someone's answers
    replayed to it. Binding each id to its caller (an HMAC, as `sessions.py` does for session ids) would bring
    resumption back."""
    if request.header(_RESUME_HEADER) is not None:
        text = "resuming a stream is not supported through the gateway: event ids are not bound to their caller"
        raise _Refusal(400, INVALID_REQUEST, text, {"code": "resumption_not_supported"})


def _strings(value: Any, out: list[str], depth: int) -> None:
    """Every string in `value` (keys too), for the data-class detectors; bounded depth."""
    if depth > 32:
        return
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.append(str(key))
            _strings(item, out, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out, depth + 1)
    elif value is not None and not isinstance(value, bool):
        out.append(str(value))


def _token_audiences(authorization: bytes | None) -> set[str]:
    """The `aud` of a bearer token that the gate has verified already."""
    if not authorization:
        return set()
    token = authorization.decode("latin-1").strip().partition(" ")[2].strip()
    parts = token.split(".")
    if len(parts) != 3:
        return set()
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return set()
    aud = claims.get("aud") if isinstance(claims, dict) else None
    values = aud if isinstance(aud, list) else [aud]
    return {v for v in values if isinstance(v, str)}


def _rpc_error(rpc_id: Any, code: int, message: str, data: Mapping[str, Any]) -> bytes:
    return orjson.dumps(
        {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message, "data": dict(data)}}
    )


def _code_of(error: IdgateError) -> int:
    if isinstance(error, PayloadTooLarge):
        return INVALID_REQUEST
    return INVALID_REQUEST if error.status < 500 else UPSTREAM_FAILED


def _error_code(refusal: _Refusal) -> str:
    if refusal.code == REFUSED:
        return "forbidden"
    if refusal.code == BUDGET_EXCEEDED:
        return "budget_exceeded"
    return "invalid_request" if refusal.status < 500 else "upstream_error"


def _upstream_refusal(server: _Server, status: int) -> _Refusal | None:
    """The upstream refused the gateway itself (its credential), or redirected: the caller cannot fix it."""
    name = server.config.name
    if status in (401, 403):
        message = f"MCP server `{name}` refused the gateway's credential (HTTP {status})"
        return _Refusal(502, UPSTREAM_FAILED, message, {"code": "upstream_error"})
    if 300 <= status < 400:
        message = f"MCP server `{name}` answered with a redirect (HTTP {status}), which is not followed"
        return _Refusal(502, UPSTREAM_FAILED, message, {"code": "upstream_error"})
    return None


def _down_headers(response: aiohttp.ClientResponse, request_id: str, session: str | None) -> list[tuple[bytes, bytes]]:
    """The response headers relayed; `session` (the caller's wrapped id) stands for the upstream's own."""
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.items()
        if k.lower() in _DOWN_HEADERS and k.lower() != "mcp-session-id"
    ]
    if session is not None:
        headers.append((b"mcp-session-id", session.encode("latin-1")))
    headers.append((b"x-request-id", request_id.encode()))
    if _is_sse(response):
        headers.append((b"x-accel-buffering", b"no"))
    return headers


def _is_sse(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


def _content_type(response: aiohttp.ClientResponse) -> bytes:
    return response.headers.get("content-type", "application/json").encode("latin-1")


async def _stream_down(
    request: Request,
    send: Send,
    facts: RequestFacts,
    response: aiohttp.ClientResponse,
    session: str | None,
    bodies: AsyncIterator[bytes],
    broken: Callable[[], bytes],
) -> bool:
    """Send `bodies` down as the answer to `response`; False if the client left first.

    A caller who leaves cancels the relay (and so the upstream read) through a watcher task;
    an upstream that breaks off is noted in `facts` and the answer ends with `broken()`.
    """
    headers = _down_headers(response, facts.request_id, session)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    relay = asyncio.current_task()
    assert relay is not None
    watcher = asyncio.get_running_loop().create_task(_cancel_when_gone(request.receive, relay))
    try:
        try:
            async for body in bodies:
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as exc:
            facts.error_code, facts.error = "upstream_error", f"the MCP server broke off ({type(exc).__name__})"
            tail = broken()
            if tail:
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True
    except asyncio.CancelledError:
        if not _client_left(watcher) or relay.uncancel() > 0:
            raise
        return False
    finally:
        watcher.cancel()


def _read_json(data: bytes) -> tuple[Any, bool]:
    """JSON as orjson reads it (True), else as Python's `json` does (False): `NaN`, `Infinity`, lone surrogates and
    deep nesting, which other servers' encoders write and their clients read; `ValueError` if neither can.

    why: a message the gateway could not read was dropped, and with it, on a POST's stream, the answer the client
    waits for. It is read, checked and written like any other (`_write_json` with the same flag keeps what it held)."""
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        try:
            return json.loads(data, parse_float=_finite), False
        except RecursionError:
            raise ValueError("nested too deeply") from None


def _finite(literal: str) -> float:
    """A JSON number as a float; `ValueError` for one too large for a float (`1e400`), which would be written
    back as `Infinity`, which no JSON parser reads (a `NaN` or `Infinity` spelled so passes as it came)."""
    number = float(literal)
    if not math.isfinite(number):
        raise ValueError(f"number {literal[:20]} is out of range")
    return number


def _write_json(message: Any, strict: bool) -> bytes:
    """`message` encoded: by orjson if it read it (`_read_json`), else by Python's `json` (keeping `NaN` and the
    like as they came); what orjson cannot write (deeper than it goes) by `json` too."""
    if strict:
        try:
            return orjson.dumps(message)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(message, separators=(",", ":")).encode()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _cancel_when_gone(receive: Callable[[], Awaitable[Any]], relay: asyncio.Task[Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    relay.cancel()


def _client_left(watcher: asyncio.Task[None]) -> bool:
    return watcher.done() and not watcher.cancelled() and watcher.exception() is None
