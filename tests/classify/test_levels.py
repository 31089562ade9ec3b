"""Ordered levels and how the three sources of a request's class combine."""

from __future__ import annotations

import pytest

from idgate.classify import DEFAULT_LEVELS, Levels, UnknownDataClass, resolve_class


def test_default_order_and_ranks() -> None:
    assert DEFAULT_LEVELS.names == ("public", "internal", "confidential", "restricted")
    assert [DEFAULT_LEVELS.rank(n) for n in DEFAULT_LEVELS.names] == [0, 1, 2, 3]
    assert DEFAULT_LEVELS.lowest == "public"
    assert "internal" in DEFAULT_LEVELS
    assert "secret" not in DEFAULT_LEVELS


def test_highest() -> None:
    assert DEFAULT_LEVELS.highest("internal", "public") == "internal"
    assert DEFAULT_LEVELS.highest("restricted", "confidential", "public") == "restricted"
    assert DEFAULT_LEVELS.highest() == "public"


def test_unknown_name_is_a_value_error_naming_the_defined_classes() -> None:
    with pytest.raises(ValueError, match="data class `secret` is not defined; defined classes: `public`, `internal`"):
        DEFAULT_LEVELS.rank("secret")
    with pytest.raises(UnknownDataClass) as caught:
        DEFAULT_LEVELS.highest("public", "secret")
    assert caught.value.name == "secret"
    assert caught.value.allowed == DEFAULT_LEVELS.names


def test_custom_levels() -> None:
    levels = Levels(("open", "team", "vault"))
    assert levels.highest("vault", "open") == "vault"
    assert levels.lowest == "open"
    assert levels == Levels(("open", "team", "vault"))
    assert hash(levels) == hash(Levels(("open", "team", "vault")))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ((), "at least one data class"),
        (("public", "public"), "listed twice: `public`"),
        (("public", "top secret"), "`top secret` is not a plain name"),
        (("public", ""), "`` is not a plain name"),
    ],
)
def test_bad_levels_are_refused(names: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Levels(names)


def test_resolve_takes_the_highest_of_the_three() -> None:
    assert resolve_class(None, None, "public", DEFAULT_LEVELS) == "public"
    assert resolve_class(None, "internal", "public", DEFAULT_LEVELS) == "internal"
    assert resolve_class("confidential", "internal", "public", DEFAULT_LEVELS) == "confidential"
    assert resolve_class(None, "restricted", "confidential", DEFAULT_LEVELS) == "restricted"


def test_a_declared_class_cannot_lower_what_was_detected() -> None:
    assert resolve_class("public", None, "confidential", DEFAULT_LEVELS) == "confidential"
    assert resolve_class("public", "public", "restricted", DEFAULT_LEVELS) == "restricted"


def test_a_declared_class_can_raise_it() -> None:
    assert resolve_class("restricted", None, "public", DEFAULT_LEVELS) == "restricted"
    assert resolve_class("restricted", "internal", "confidential", DEFAULT_LEVELS) == "restricted"


def test_an_unknown_declared_class_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as caught:
        resolve_class("top-secret", None, "public", DEFAULT_LEVELS)
    assert str(caught.value) == (
        "declared data class `top-secret` is not defined; "
        "defined classes: `public`, `internal`, `confidential`, `restricted`"
    )
    assert isinstance(caught.value, UnknownDataClass)


def test_unknown_configured_or_detected_classes_are_refused() -> None:
    with pytest.raises(UnknownDataClass, match="configured data class `nope`"):
        resolve_class(None, "nope", "public", DEFAULT_LEVELS)
    with pytest.raises(UnknownDataClass, match="detected data class `nope`"):
        resolve_class(None, None, "nope", DEFAULT_LEVELS)


def test_the_declared_name_is_shown_safely() -> None:
    with pytest.raises(UnknownDataClass) as caught:
        resolve_class("x\n" + "y" * 500, None, "public", DEFAULT_LEVELS)
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 200


class _Ordering:
    """Any object with `names` and `rank` will do (the policy stage has its own type)."""

    names = ("low", "high")

    def rank(self, name: str) -> int:
        return self.names.index(name)


def test_resolve_works_with_any_ordering() -> None:
    assert resolve_class("low", None, "high", _Ordering()) == "high"
    assert resolve_class("high", None, "low", _Ordering()) == "high"
    with pytest.raises(UnknownDataClass, match="defined classes: `low`, `high`"):
        resolve_class("public", None, "low", _Ordering())
