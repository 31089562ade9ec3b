"""The gateway's signing keys in the state folder, and the package's import shape."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, KeySetSerialization

from idgate.errors import ConfigError
from idgate.identity.principal import Actor, Principal
from idgate.sts.keys import KEYS_FILE, SigningKeys
from idgate.sts.tokens import Grant, TokenMinter, act_claim

_OPEN = "from pathlib import Path; from idgate.sts.keys import SigningKeys; import sys; "


def test_created_once_with_mode_0600(tmp_path: Path) -> None:
    keys = SigningKeys.open(tmp_path / "home")
    path = tmp_path / "home" / KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kid = keys.current().kid
    assert SigningKeys.open(tmp_path / "home").current().kid == kid
    assert [p.name for p in (tmp_path / "home").iterdir()] == [KEYS_FILE]  # no temporary file left


def test_workers_starting_together_share_one_key(tmp_path: Path) -> None:
    script = _OPEN + "print(SigningKeys.open(Path(sys.argv[1])).current().kid)"
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    kids = {worker.communicate(timeout=60)[0].strip() for worker in workers}
    assert all(worker.returncode == 0 for worker in workers)
    assert len(kids) == 1 and "" not in kids


def test_rotation_keeps_previous_keys_published(tmp_path: Path) -> None:
    keys = SigningKeys.open(tmp_path, "RS256")
    other_worker = SigningKeys.open(tmp_path)
    first = keys.current().kid
    second = keys.rotate(keep=1, algorithm="ES256")
    assert keys.current().kid == second and keys.current().alg == "ES256"
    published = [k["kid"] for k in other_worker.jwks()["keys"]]  # another process sees the new file
    assert published == [second, first]
    assert other_worker.current().kid == second
    third = keys.rotate(keep=1)
    assert [k["kid"] for k in keys.jwks()["keys"]] == [third, second]
    assert all("d" not in k for k in keys.jwks()["keys"])
    assert stat.S_IMODE((tmp_path / KEYS_FILE).stat().st_mode) == 0o600


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    SigningKeys.open(tmp_path)
    os.chmod(tmp_path / KEYS_FILE, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        SigningKeys.open(tmp_path)


def test_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEYS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    os.close(fd)
    with pytest.raises(ConfigError, match="signing keys"):
        SigningKeys.open(tmp_path)


def test_act_claim_nests_prior_actors_inside() -> None:
    chain = (Actor("b", "agent", "https://idp"), Actor("a", "service"))
    assert act_claim(chain) == {
        "sub": "b",
        "kind": "agent",
        "iss": "https://idp",
        "act": {"sub": "a", "kind": "service"},
    }
    assert act_claim(()) is None


def test_minted_token_verifies_with_the_published_keys(tmp_path: Path) -> None:
    keys = SigningKeys.open(tmp_path)
    minter = TokenMinter(keys, "https://gw", clock=lambda: 1_000_000.0)
    grant = Grant(
        subject=Principal("human", "alice", "acme", "https://idp", ("g1",)),
        subject_issuer="https://idp",
        audiences=("a", "b"),
        expires_at=1_000_300,
        scope=("chat",),
        task="t1",
        session="s1",
    )
    minted = minter.mint(grant)
    assert minted.expires_in == 300
    claims = jwt.decode(minted.token, KeySet.import_key_set(cast(KeySetSerialization, keys.jwks()))).claims
    assert claims["aud"] == ["a", "b"] and claims["groups"] == ["g1"] and claims["sid"] == "s1"
    assert "act" not in claims
    with pytest.raises(ValueError, match="future"):
        minter.mint(Grant(grant.subject, "https://idp", ("a",), expires_at=1_000_000))


def test_settings_import_nothing_else_of_idgate() -> None:
    """`idgate.config` imports `idgate.sts.settings`: anything more would be an import cycle."""
    script = "import sys, idgate.sts.settings; print(sorted(m for m in sys.modules if m.startswith('idgate')))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    # Only other pydantic-only settings modules (e.g. `idgate.sts.client_settings`) may come along.
    modules = out.stdout.strip().strip("[]").replace("'", "").split(", ")
    assert {"idgate", "idgate.sts", "idgate.sts.settings"} <= set(modules)
    leaves = ("idgate", "idgate.sts", "idgate.errors", "idgate.secretref")  # import nothing else of idgate
    assert all(m in leaves or m.endswith("settings") for m in modules), modules
