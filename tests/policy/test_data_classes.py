"""DataClasses: an ordered set of names with ranks."""

from __future__ import annotations

import pytest

from idgate.policy import DEFAULT_DATA_CLASSES, DataClasses


def test_the_default_order() -> None:
    classes = DataClasses()
    assert classes.names == DEFAULT_DATA_CLASSES == ("public", "internal", "confidential", "restricted")
    assert [classes.rank(n) for n in classes] == [0, 1, 2, 3]
    assert classes.name(2) == "confidential"
    assert (classes.lowest, classes.highest_class) == ("public", "restricted")
    assert classes.highest(["internal", "confidential", "public"]) == "confidential"
    assert classes.highest([]) == "public"
    assert "internal" in classes and "secret" not in classes


def test_a_configured_order() -> None:
    classes = DataClasses(["open", "sensitive", "secret"])
    assert classes.rank("secret") == 2
    assert classes == DataClasses(("open", "sensitive", "secret"))
    assert classes != DataClasses()


@pytest.mark.parametrize(
    ("names", "message"),
    [([], "at least one"), (["a", "a"], "listed twice"), (["top secret"], "not a plain name")],
)
def test_bad_orders_are_refused(names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataClasses(names)


def test_unknown_names_and_ranks_say_what_is_known() -> None:
    with pytest.raises(ValueError, match="data class `secret` is not defined; defined classes: `public`"):
        DataClasses().rank("secret")
    with pytest.raises(ValueError, match="out of range"):
        DataClasses().name(4)
