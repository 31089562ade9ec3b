"""A standard MCP client gets its own token: the SDK's OAuth support, from the 401 to the tool call.

The official `mcp` SDK's `PrivateKeyJWTOAuthProvider` (client credentials,
`private_key_jwt`) starts with no token, is refused with a `WWW-Authenticate`
challenge naming `/.well-known/oauth-protected-resource/mcp/tools`, reads it
(RFC 9728), finds the gateway's token service (RFC 8414), obtains a token for
the MCP resource and calls the tool, which gets a token minted for it alone.
"""

from __future__ import annotations

from typing import Any

import httpx2
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import RSAKey
from mcp import Client
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider, SignedJWTParameters
from mcp.client.streamable_http import streamable_http_client

from tests.mcp.conftest import MakeMcpGateway
from tests.mcp.toolserver import ToolServer
from tests.sts.test_clients import MemoryStorage


async def test_sdk_oauth_client_gets_a_token_by_itself(
    make_mcp_gateway: MakeMcpGateway, tool_server: ToolServer
) -> None:
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
    key.ensure_kid()
    client_config: dict[str, Any] = {
        "client_id": "mcp-agent",
        "jwks": {"keys": [key.as_dict(private=False)]},
        "tenant": "acme",
    }
    gateway = make_mcp_gateway(sts_clients=[client_config])
    pem = key.private_key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    storage = MemoryStorage()
    auth = PrivateKeyJWTOAuthProvider(
        server_url=f"{gateway.url}/mcp/tools",
        storage=storage,
        client_id="mcp-agent",
        assertion_provider=SignedJWTParameters(
            issuer="mcp-agent", subject="mcp-agent", signing_key=pem
        ).create_assertion_provider(),
        issuer=gateway.url,
    )
    async with httpx2.AsyncClient(auth=auth, timeout=10) as http:
        transport = streamable_http_client(f"{gateway.url}/mcp/tools", http_client=http)
        async with Client(transport, cache=None) as mcp:
            result = await mcp.call_tool("whoami", {})
    assert storage.tokens is not None  # obtained by the SDK from the gateway's token service
    seen = result.structured_content
    assert seen is not None and storage.tokens.access_token not in seen["authorization"]
    assert seen["claims"]["sub"] == "mcp-agent" and seen["claims"]["aud"] == tool_server.url
    assert all(storage.tokens.access_token not in str(s.headers) for s in tool_server.seen)
    # It began without a token: refused, with the challenge that sent it to the token service.
    stories = [r for r in gateway.raw_records() if r["kind"] == "identity" and r.get("path") == "/mcp/tools"]
    assert stories[0]["status"] == 401 and stories[0]["subject"] is None
    exchanges = [r for r in gateway.raw_records() if r["kind"] not in ("identity", "decision", "action")]
    assert exchanges, "the token service recorded the token it issued"
