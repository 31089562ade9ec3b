"""Ordered data-class levels, and how a request's class is resolved from its three sources.

A request's class is the highest of: the class the caller declares, the class
configured for the caller's tenant or app, and what the detectors found. So a
caller can raise its class but never lower it below what the detectors saw.

Everything here works against `Ordering`, the two members any ordered set of
class names offers (`names`, `rank`), so the policy stage's own ordered type can
be passed wherever a `Levels` is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from idgate.errors import shown

__all__ = ["DEFAULT_LEVELS", "DEFAULT_NAMES", "Levels", "Ordering", "UnknownDataClass", "resolve_class"]

DEFAULT_NAMES = ("public", "internal", "confidential", "restricted")


class Ordering(Protocol):
    """An ordered set of data-class names, lowest first."""

    @property
    def names(self) -> tuple[str, ...]: ...

    def rank(self, name: str) -> int: ...


class UnknownDataClass(ValueError):
    """A data-class name that the configured levels do not define."""

    def __init__(self, name: str, allowed: tuple[str, ...], what: str = "data class", where: str = "") -> None:
        known = ", ".join(f"`{n}`" for n in allowed)
        super().__init__(f"{what} `{shown(name)}`{where} is not defined; defined classes: {known}")
        self.name = name
        self.allowed = allowed


@dataclass(frozen=True, slots=True)
class Levels:
    """Data-class names ordered lowest first; a class's rank is its index.

    >>> levels = Levels()
    >>> levels.rank("confidential")
    2
    >>> levels.highest("internal", "public")
    'internal'
    """

    names: tuple[str, ...] = DEFAULT_NAMES
    _ranks: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        if not names:
            raise ValueError("at least one data class is needed")
        for name in names:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"data class `{shown(name)}` is not a plain name (letters, digits, `_`)")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data classes listed twice: {', '.join(f'`{n}`' for n in twice)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_ranks", {name: rank for rank, name in enumerate(names)})

    @property
    def lowest(self) -> str:
        return self.names[0]

    def rank(self, name: str) -> int:
        """The rank of `name`; `UnknownDataClass` (a `ValueError`) if it is not defined."""
        try:
            return self._ranks[name]
        except KeyError:
            raise UnknownDataClass(name, self.names) from None

    def highest(self, *names: str) -> str:
        """The highest of `names`; the lowest class when none is given."""
        return self.names[max((self.rank(n) for n in names), default=0)]

    def __contains__(self, name: object) -> bool:
        return name in self._ranks


DEFAULT_LEVELS = Levels()


def resolve_class(declared: str | None, configured: str | None, detected: str, levels: Ordering) -> str:
    """The request's class: the highest of the declared, the configured and the detected class.

    A declared class can only raise the result. A declared name that `levels`
    does not define raises `UnknownDataClass` (a `ValueError`) that names the
    defined ones; so do an unknown configured or detected name, which are
    configuration or programming errors rather than caller input.
    """
    names = levels.names
    for what, name in (("declared data class", declared), ("configured data class", configured)):
        if name is not None and name not in names:
            raise UnknownDataClass(name, names, what)
    if detected not in names:
        raise UnknownDataClass(detected, names, "detected data class")
    best = detected
    for name in (declared, configured):
        if name is not None and levels.rank(name) > levels.rank(best):
            best = name
    return best
