"""The policy stage: `authorize(caller, action, resource, context) -> Decision`.

Pure and synchronous: everything the decision needs is passed in, nothing is
fetched. Any error inside an authorizer is a deny that carries the error.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from idgate.identity.principal import Caller

__all__ = ["REASONS", "Authorizer", "Decision", "Resource"]

# The categories a refused caller is shown; never policy text.
REASONS = ("allowed", "tenant", "data_class", "tool", "scope", "delegation", "kind", "binding", "error")


@dataclass(frozen=True, slots=True)
class Resource:
    """What a call is about: a model, a tool (`server/name`) or an audience.

    `attributes` describe a resource the entity data does not declare (a tool
    discovered at run time); a declared resource takes its attributes from the
    entity data alone, and those given here are ignored. `tenant` is for
    authorizers without entity data; the Cedar authorizer reads the data's.
    """

    kind: str  # "model", "tool", "audience"
    id: str
    tenant: str | None = None
    attributes: Mapping[str, Any] | None = None


# Decision ids: a random per-process prefix and a counter, unique across workers and
# restarts without a system call per decision (one is made on every request).
_ID_PREFIX = "dec_" + os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def _decision_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


# Not frozen: a frozen dataclass sets each field through object.__setattr__, measurably
# slow on a path taken for every request. Treat decisions as immutable all the same.
@dataclass(slots=True)
class Decision:
    """An authorization decision and why; an error inside the authorizer is a deny carrying it."""

    allowed: bool
    policies: tuple[str, ...]  # ids of what decided it
    reason: str  # category shown to the caller: one of REASONS
    errors: tuple[str, ...] = ()
    id: str = field(default_factory=_decision_id)
    revision: str = ""  # the policy revision that decided it
    denied_for: str = ""  # the principal of the chain that was refused, e.g. `Agent::"bot"`


class Authorizer(Protocol):
    def authorize(self, caller: Caller, action: str, resource: Resource, context: Mapping[str, Any]) -> Decision: ...
