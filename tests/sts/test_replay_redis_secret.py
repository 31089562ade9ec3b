"""The replay cache on a Redis with a password: the URL is a secret (`{env}` or `{file}`), never inline.

A URL with a password in the YAML is refused when the config is loaded; one
from a secret is revealed when the cache is built. Against a real
`redis-server --requirepass` started here on a free loopback port: DPoP proofs
are single-use through the gateway with the right password, and with a wrong
one every check fails closed (503) on first use, with an error in the log
that names the setting and never the password.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx2
import openai
import orjson
import pytest
import redis

from idgate.config import SecretRef, parse_config
from idgate.errors import ConfigError, ServiceUnavailable
from idgate.identity.replay import RedisReplayCache, build_replay_cache
from tests.conftest import MakeGateway, base_config
from tests.dpop_client import DPoPKey
from tests.support import Gateway, TestIssuer, Upstream, free_port
from tests.test_dpop_gateway import ACCESS_TOKEN, TOKEN_EXCHANGE, assert_dpop_refusal, bound_token, send

PASSWORD = "s3cret-replay-cache-pw"
BASE: dict[str, Any] = {"dev_issuer": {"enabled": True}}


def replay_cache(settings: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    config = parse_config({**BASE, "sts": {"replay_cache": settings}}, env or {})
    return config.sts.replay_cache


# -- the settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PASSWORD}@127.0.0.1:6379/0",
        f"redis://idgate:{PASSWORD}@127.0.0.1:6379/0",
        f"rediss://idgate:{PASSWORD}@redis.example:6380/0",
        f"redis://127.0.0.1:6379/0?password={PASSWORD}",
        f"unix:///run/redis.sock?db=0&Password={PASSWORD}",
    ],
)
def test_a_password_in_the_yaml_is_refused_at_load(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        replay_cache({"backend": "redis", "redis_url": url})
    message = str(refused.value)
    assert "sts.replay_cache.redis_url" in message and "must not contain a password" in message, message
    assert "{env: NAME}" in message and "{file: PATH}" in message, message
    assert PASSWORD not in message


def test_a_url_without_a_password_stays_a_string_and_a_secret_is_a_reference(tmp_path: Path) -> None:
    plain = replay_cache({"backend": "redis", "redis_url": "redis://idgate@127.0.0.1:6379/0"})
    assert plain.redis_url == "redis://idgate@127.0.0.1:6379/0"  # a user name alone is no secret
    from_env = replay_cache({"backend": "redis", "redis_url": {"env": "REPLAY_REDIS_URL"}})
    assert from_env.redis_url == SecretRef(env="REPLAY_REDIS_URL")
    from_file = replay_cache({"backend": "redis", "redis_url": {"file": str(tmp_path / "url")}})
    assert isinstance(from_file.redis_url, SecretRef) and from_file.redis_url.file == tmp_path / "url"
    with pytest.raises(ConfigError, match="redis://, rediss:// or unix://"):
        replay_cache({"backend": "redis", "redis_url": "http://127.0.0.1:6379"})
    with pytest.raises(ConfigError, match="exactly one of `env` or `file`"):
        replay_cache({"backend": "redis", "redis_url": {"env": "A", "file": "b"}})
    with pytest.raises(ConfigError, match="needs `redis_url`"):
        replay_cache({"backend": "redis"})


def test_a_secret_url_is_checked_when_revealed_without_showing_it(tmp_path: Path) -> None:
    settings = replay_cache({"backend": "redis", "redis_url": {"env": "REPLAY_REDIS_URL"}})
    unset = parse_config(BASE, {})
    with pytest.raises(ConfigError, match="`REPLAY_REDIS_URL` is not set"):
        build_replay_cache(settings, tmp_path, unset.reveal)
    wrong = parse_config(BASE, {"REPLAY_REDIS_URL": f"http://:{PASSWORD}@127.0.0.1:6379"})
    with pytest.raises(ConfigError, match="redis://, rediss:// or unix://") as refused:
        build_replay_cache(settings, tmp_path, wrong.reveal)
    assert PASSWORD not in str(refused.value)


# -- against a real redis-server with a password ---------------------------------------------------------------


@dataclass(frozen=True)
class PasswordRedis:
    port: int
    password: str

    def url(self, password: str | None = None) -> str:
        return f"redis://:{password or self.password}@127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("the `redis-server` binary is not installed (apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    # why: the password goes in a config file read from stdin (`-`), not on the command line that `ps` shows.
    settings = f'port {port}\nbind 127.0.0.1\nrequirepass "{PASSWORD}"\nsave ""\nappendonly no\ndir {folder}\n'
    server = subprocess.Popen(
        [binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    assert server.stdin is not None
    server.stdin.write(settings)
    server.stdin.close()
    client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    client.close()
    yield PasswordRedis(port, PASSWORD)
    server.terminate()
    server.wait(10)


def secret_settings(prefix: str) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": {"env": "REPLAY_REDIS_URL"}, "redis_prefix": prefix}


async def test_the_cache_built_from_an_env_secret_works_and_does_not_show_it(
    password_redis: PasswordRedis, tmp_path: Path
) -> None:
    prefix = f"idgate-test:{secrets.token_hex(6)}:"
    config = parse_config(
        {**BASE, "sts": {"replay_cache": secret_settings(prefix)}}, {"REPLAY_REDIS_URL": password_redis.url()}
    )
    one = build_replay_cache(config.sts.replay_cache, tmp_path, config.reveal)
    two = build_replay_cache(config.sts.replay_cache, tmp_path, config.reveal)  # another replica
    try:
        assert isinstance(one, RedisReplayCache)
        later = time.time() + 60
        assert await one.first_use("dpop", "jti-1", later) is True
        assert await two.first_use("dpop", "jti-1", later) is False  # seen by the other replica, through Redis
        assert await two.first_use("dpop", "jti-2", later) is True
    finally:
        await one.close()
        await two.close()
    for shown in (repr(config), repr(config.sts.replay_cache), repr(one), str(config.model_dump())):
        assert PASSWORD not in shown


async def test_a_wrong_password_fails_closed_on_first_use_with_a_clear_error(
    password_redis: PasswordRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for url in (password_redis.url("not-the-password"), f"redis://127.0.0.1:{password_redis.port}/0"):
        config = parse_config(
            {**BASE, "sts": {"replay_cache": secret_settings("idgate-test:")}}, {"REPLAY_REDIS_URL": url}
        )
        cache = build_replay_cache(config.sts.replay_cache, tmp_path, config.reveal)  # nothing connected yet
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="idgate.identity"):
            for _ in range(2):  # refused every time, never an allow
                with pytest.raises(ServiceUnavailable):
                    await cache.first_use("dpop", "jti-1", time.time() + 60)
        await cache.close()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and "refused the credentials of `sts.replay_cache.redis_url`" in errors[0].getMessage()
        assert PASSWORD not in caplog.text and "not-the-password" not in caplog.text


# -- through the gateway ---------------------------------------------------------------------------------------


def gateway_on_redis(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, url: str) -> Gateway:
    config = base_config(issuer, upstream)
    config["sts"] = {"replay_cache": secret_settings(f"idgate-test:{secrets.token_hex(6)}:")}
    return make_gateway(config, {"REPLAY_REDIS_URL": url})


def test_the_gateway_refuses_a_replayed_proof_through_a_redis_with_a_password(
    password_redis: PasswordRedis, make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    gateway = gateway_on_redis(make_gateway, issuer, upstream, password_redis.url())
    key = DPoPKey()
    token = bound_token(gateway, issuer, key)
    proofs: list[str] = []

    def prove(request: httpx2.Request) -> None:
        proofs.append(key.proof(request.method, str(request.url.copy_with(query=None)), token=token))
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = proofs[-1]

    with openai.OpenAI(
        base_url=f"{gateway.url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx2.Client(event_hooks={"request": [prove]}),
    ) as sdk:
        reply = sdk.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "upstream says hi"
    again = send(gateway, "/v1/chat/completions", [("Authorization", f"DPoP {token}"), ("DPoP", proofs[-1])])
    assert_dpop_refusal(again, "invalid_dpop_proof", "used before")
    assert PASSWORD not in str(gateway.raw_records())


def test_the_gateway_with_a_wrong_password_starts_and_refuses_every_proof(
    password_redis: PasswordRedis,
    make_gateway: MakeGateway,
    issuer: TestIssuer,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = password_redis.url("not-the-password")
    with caplog.at_level(logging.WARNING, logger="idgate.identity"):
        gateway = gateway_on_redis(make_gateway, issuer, upstream, wrong)
        form = urlencode(
            {"grant_type": TOKEN_EXCHANGE, "subject_token": issuer.mint(), "subject_token_type": ACCESS_TOKEN}
        ).encode()
        proof = DPoPKey().proof("POST", f"{gateway.url}/oauth2/token")
        headers = [("Content-Type", "application/x-www-form-urlencoded"), ("DPoP", proof)]
        reply = send(gateway, "/oauth2/token", headers, form)
    assert reply.status == 503, reply.body
    assert "access_token" not in orjson.loads(reply.body)
    assert "refused the credentials of `sts.replay_cache.redis_url`" in caplog.text
    assert "not-the-password" not in caplog.text and "not-the-password" not in str(gateway.raw_records())
