"""Data classes: an ordered set of sensitivity levels, shared by classifier and policy.

The default order is ``public < internal < confidential < restricted``; a
deployment may configure its own. A class's *rank* is its index in the order,
and that is what policies compare (``context.data_class_rank``,
``resource.max_data_class``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["DEFAULT_DATA_CLASSES", "DataClasses"]

DEFAULT_DATA_CLASSES = ("public", "internal", "confidential", "restricted")


class DataClasses:
    """An ordered set of data-class names; lowest first.

    >>> classes = DataClasses()
    >>> classes.rank("confidential")
    2
    >>> classes.highest(["internal", "public"])
    'internal'
    """

    __slots__ = ("_names", "_ranks")

    def __init__(self, names: Iterable[str] = DEFAULT_DATA_CLASSES) -> None:
        ordered = tuple(names)
        if not ordered:
            raise ValueError("at least one data class is needed")
        for name in ordered:
            if not name or not name.isidentifier():
                raise ValueError(f"data class `{name}` is not a plain name (letters, digits, `_`)")
        dupes = sorted({n for n in ordered if ordered.count(n) > 1})
        if dupes:
            raise ValueError(f"data classes listed twice: {', '.join(f'`{d}`' for d in dupes)}")
        self._names = ordered
        self._ranks = {name: rank for rank, name in enumerate(ordered)}

    @property
    def names(self) -> tuple[str, ...]:
        """The classes, lowest first."""
        return self._names

    @property
    def lowest(self) -> str:
        return self._names[0]

    @property
    def highest_class(self) -> str:
        return self._names[-1]

    def rank(self, name: str) -> int:
        """The rank of `name`; `ValueError` naming the known classes if it is not one."""
        try:
            return self._ranks[name]
        except KeyError:
            known = ", ".join(f"`{n}`" for n in self._names)
            raise ValueError(f"data class `{name}` is not defined; defined classes: {known}") from None

    def name(self, rank: int) -> str:
        """The class of rank `rank`."""
        if not 0 <= rank < len(self._names):
            raise ValueError(f"data class rank {rank} is out of range 0..{len(self._names) - 1}")
        return self._names[rank]

    def highest(self, names: Iterable[str]) -> str:
        """The highest of `names` (the lowest class when `names` is empty)."""
        return self._names[max((self.rank(n) for n in names), default=0)]

    def __contains__(self, name: object) -> bool:
        return name in self._ranks

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataClasses) and other._names == self._names

    def __hash__(self) -> int:
        return hash(self._names)

    def __repr__(self) -> str:
        return f"DataClasses({list(self._names)!r})"
