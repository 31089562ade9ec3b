"""OAuth errors of the token service, each speaking RFC 6749 §5.2 on the wire::

    IdgateError (idgate.errors)
    └── OAuthError                   400
        ├── InvalidRequest           400 invalid_request
        ├── InvalidClient            401 invalid_client
        ├── InvalidGrant             400 invalid_grant
        ├── UnauthorizedClient       400 unauthorized_client
        ├── UnsupportedGrantType     400 unsupported_grant_type
        ├── InvalidScope             400 invalid_scope
        ├── InvalidTarget            400 invalid_target (RFC 8693 §2.2.2)
        └── TemporarilyUnavailable   503 temporarily_unavailable

The message becomes `error_description`: the same grammar as every idgate
message, and never a token or a secret (the endpoint checks that too).
"""

from __future__ import annotations

from typing import Any

from idgate.errors import IdgateError

__all__ = [
    "InvalidClient",
    "InvalidGrant",
    "InvalidRequest",
    "InvalidScope",
    "InvalidTarget",
    "OAuthError",
    "TemporarilyUnavailable",
    "UnauthorizedClient",
    "UnsupportedGrantType",
]


class OAuthError(IdgateError):
    """An OAuth error response: `error` is the RFC code, the message its description."""

    status = 400
    error = "invalid_request"
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = self.error

    def payload(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.message}


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    status = 401
    error = "invalid_client"


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    error = "invalid_target"


class TemporarilyUnavailable(OAuthError):
    status = 503
    error = "temporarily_unavailable"
