"""`idgate keys rotate`: a new current key, the previous ones still published."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from idgate.sts.keys import SigningKeys


def rotate(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IDGATE_HOME": str(home)}
    env.pop("IDGATE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "idgate", "keys", "rotate"], capture_output=True, text=True, timeout=60, env=env
    )


def test_rotation_publishes_a_new_key_and_keeps_the_previous(tmp_path: Path) -> None:
    first = SigningKeys.open(tmp_path).current().kid
    done = rotate(tmp_path)
    assert done.returncode == 0, done.stderr
    keys = SigningKeys.open(tmp_path)
    assert keys.current().kid != first and f"`{keys.current().kid}`" in done.stdout
    assert [k["kid"] for k in keys.jwks()["keys"]] == [keys.current().kid, first]
    for _ in range(3):
        assert rotate(tmp_path).returncode == 0
    assert len(SigningKeys.open(tmp_path).jwks()["keys"]) == 3  # the current one and sts.previous_keys = 2
