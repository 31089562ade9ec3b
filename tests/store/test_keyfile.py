"""Secret keys in the state folder: made once, private, the same for every worker, refused when damaged."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from idgate.store.keyfile import state_key


def test_a_key_is_made_once_private_and_shared(tmp_path: Path) -> None:
    home = tmp_path / "state"
    with ProcessPoolExecutor(4) as pool:  # workers racing to make it agree on one key
        keys = set(pool.map(state_key, [home] * 8, ["test.key"] * 8))
    assert len(keys) == 1 and len(keys.pop()) == 32
    assert (home / "test.key").stat().st_mode & 0o077 == 0
    assert [p.name for p in home.iterdir()] == ["test.key"]  # no temporary file left behind


@pytest.mark.parametrize("content", ["not hex", "ab" * 8])
def test_a_damaged_key_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "test.key").write_text(content)
    with pytest.raises(OSError, match="remove it to have a new key made"):
        state_key(tmp_path, "test.key")
