"""One error tree for everything a caller can be told.

Each error knows its HTTP status, its wire code and a message that is safe to
show the caller (no token, key or policy text ever goes into one)::

    IdgateError                      500 internal_error
    ├── ConfigError                  (start-up only, never on the wire)
    ├── AuthenticationError          401 (+ WWW-Authenticate: Bearer)
    │   ├── MissingCredential        401 missing_token
    │   └── InvalidToken             401 invalid_token
    ├── Forbidden                    403 forbidden
    ├── BadRequest                   400 invalid_request
    │   ├── MalformedJSON            400 invalid_json
    │   └── UnknownModel             404 model_not_found
    ├── NotFound                     404 not_found
    ├── MethodNotAllowed             405 method_not_allowed
    ├── PayloadTooLarge              413 request_too_large
    ├── ServiceUnavailable           503 unavailable
    └── UpstreamError                502 upstream_error
        └── UpstreamTimeout          504 upstream_timeout

Messages follow one grammar: lowercase, no final period, the caller's input in
backticks, say what was wrong and what would be right.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BadRequest",
    "ConfigError",
    "Forbidden",
    "IdgateError",
    "InvalidToken",
    "MalformedJSON",
    "MethodNotAllowed",
    "MissingCredential",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "UnknownModel",
    "UpstreamError",
    "UpstreamTimeout",
    "shown",
]


def shown(value: object, limit: int = 80) -> str:
    """A caller-supplied value as it may appear in a message: printable, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class IdgateError(Exception):
    """Root of every error idgate raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(IdgateError):
    """A configuration that cannot be served; `problems` lists each bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class AuthenticationError(IdgateError):
    status = 401
    type = "authentication_error"
    # Where clients find out how to get a token (RFC 9728), named in the WWW-Authenticate challenge.
    resource_metadata: str | None = None
    # The challenge's scheme and extra parameters (e.g. `DPoP`, `algs="ES256"`), and headers to add (`DPoP-Nonce`).
    scheme: str = "Bearer"
    challenge_params: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()


class MissingCredential(AuthenticationError):
    code = "missing_token"


class InvalidToken(AuthenticationError):
    code = "invalid_token"


class Forbidden(IdgateError):
    status = 403
    code = "forbidden"
    type = "permission_error"


class BadRequest(IdgateError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class MalformedJSON(BadRequest):
    code = "invalid_json"


class UnknownModel(BadRequest):
    status = 404
    code = "model_not_found"


class NotFound(IdgateError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class MethodNotAllowed(IdgateError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class PayloadTooLarge(IdgateError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class ServiceUnavailable(IdgateError):
    status = 503
    code = "unavailable"
    type = "server_error"


class UpstreamError(IdgateError):
    status = 502
    code = "upstream_error"
    type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
