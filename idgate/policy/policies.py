"""Policy files: parsed, checked against the schema, and mapped back to file and line.

Each file is parsed and validated on its own, so Cedar's messages can be placed:
``policies/tenant.cedar:12: for policy `tenant-isolation`, attribute `tenat` on
entity type `Model` not found``. Cedar reports no positions, so a position is
found here: a policy's index (Cedar's ``policyN``) maps to the line where it
starts, a parse error to the first line at which the text stops being a valid
prefix, and a quoted name in the message to the line in the policy that holds it.

Annotations idgate reads: ``@id("...")`` names the policy in decisions and audit
records (default: ``FILE:LINE``); ``@reason("...")`` on a `forbid` is the
category a refused caller is shown.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import cedarpy
from cedarpy import pst

from idgate.errors import ConfigError

__all__ = [
    "ACTIONS",
    "FORBID_REASONS",
    "PolicyBundle",
    "PolicyError",
    "PolicyInfo",
    "PolicyProblem",
    "compile_policies",
]

FORBID_REASONS = ("tenant", "data_class", "tool", "scope", "delegation", "kind", "binding")
# The schema's actions and the resource kinds each applies to.
ACTIONS: dict[str, frozenset[str]] = {
    "invoke_model": frozenset({"model"}),
    "call_tool": frozenset({"tool"}),
    "exchange_token": frozenset({"audience", "model", "tool"}),
}


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong with a policy file, where it is."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class PolicyError(ConfigError):
    """Policy files that cannot be served; `locations` holds each problem's file and line."""

    def __init__(self, problems: Sequence[PolicyProblem]) -> None:
        super().__init__([str(p) for p in problems])
        self.locations = tuple(problems)


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """What decisions report about one policy."""

    cedar_id: str  # Cedar's own id in the combined set: policy0, policy1, ...
    index: int  # position in the combined set
    id: str  # @id, or FILE:LINE
    effect: str  # permit | forbid
    reason: str | None  # @reason, forbid only
    file: str
    line: int


@dataclass(frozen=True)
class PolicyBundle:
    """A validated policy set: the engine handle plus what decisions report."""

    policy_set: cedarpy.PolicySet
    by_action: dict[str, cedarpy.PolicySet]  # the policies whose scope admits each action, same ids
    info: dict[str, PolicyInfo]  # by cedar_id
    literals: frozenset[tuple[str, str]]  # every entity uid the policies name
    texts: tuple[tuple[str, str], ...]  # (file, text), for the revision


@dataclass(frozen=True, slots=True)
class _Chunk:
    start: int  # 1-based line of the policy's first token
    lines: tuple[int, int]  # 1-based first and last line of the text up to its `;`
    text: str


def _chunks(text: str) -> list[_Chunk]:
    """Split policy text at each top-level `;` (outside strings and `//` comments)."""
    chunks: list[_Chunk] = []
    begin, first, i, line, in_string = 0, 0, 0, 1, False
    begin_line = 1
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            first = first or line
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif c == ";":
            chunks.append(_Chunk(first or line, (begin_line, line), text[begin : i + 1]))
            begin, first, begin_line = i + 1, 0, line
        elif not c.isspace():
            first = first or line
        if i < len(text) and text[i] == "\n":
            line += 1
        i += 1
    if first:  # text after the last `;`
        chunks.append(_Chunk(first, (begin_line, line), text[begin:]))
    return chunks


def _line_of(chunk: _Chunk, message: str) -> int:
    """The line of the chunk holding the first name quoted in `message`, else its start."""
    lines = chunk.text.split("\n")
    for name in re.findall(r"`([^`]+)`", message):
        if re.fullmatch(r"policy\d+", name):  # Cedar's own policy ids
            continue
        pattern = re.compile(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])")
        for offset, text in enumerate(lines):
            if pattern.search(text.split("//")[0]):
                return chunk.lines[0] + offset
    return chunk.start


def _parse_error_line(text: str) -> int:
    """The line of the first parse error: in the first policy that fails alone, the first
    line at which a prefix of it shows that policy's error."""
    for chunk in _chunks(text):
        try:
            cedarpy.PolicySet.from_str(chunk.text)
            continue
        except ValueError as exc:
            chunk_message = str(exc)
        lines = chunk.text.split("\n")
        for k in range(1, len(lines) + 1):
            try:
                cedarpy.PolicySet.from_str("\n".join(lines[:k]))
            except ValueError as exc:
                if str(exc) == chunk_message:
                    return chunk.lines[0] + k - 1
        return chunk.start
    return 1


def _annotation(policy: pst.Template, name: str) -> str | None:
    value = policy.annotations.get(name)
    return None if value is None else str(value)


def _check_file(
    name: str, text: str, schema: cedarpy.Schema, first_index: int
) -> tuple[list[PolicyInfo], list[pst.Template], set[tuple[str, str]], list[PolicyProblem]]:
    try:
        cedarpy.PolicySet.from_str(text)
        tree = cedarpy.policies_to_pst(text)
    except ValueError as exc:
        return [], [], set(), [PolicyProblem(name, _parse_error_line(text), str(exc))]
    problems: list[PolicyProblem] = []
    every = sorted([*tree.static_policies, *tree.templates], key=lambda local: int(local.removeprefix("policy")))
    chunks = _chunks(text)
    if len(chunks) != len(every):  # should not happen; keep positions honest
        chunks = [_Chunk(1, (1, 1), text)] * len(every)
    chunk_of = dict(zip(every, chunks, strict=True))
    for local_id in tree.templates:
        message = "templates (`?principal`, `?resource`) are not supported; grant with entity data"
        problems.append(PolicyProblem(name, chunk_of[local_id].start, message))
    if problems:
        return [], [], set(), problems
    infos: list[PolicyInfo] = []
    local_ids: dict[str, str] = {}
    policies = [(local_id, tree.static_policies[local_id]) for local_id in every]
    for index, (chunk, (local_id, policy)) in enumerate(zip(chunks, policies, strict=True)):
        policy_id = _annotation(policy, "id") or f"{name}:{chunk.start}"
        local_ids[local_id] = policy_id
        reason = _annotation(policy, "reason")
        if reason is not None and policy.effect != "forbid":
            problems.append(
                PolicyProblem(name, _line_of(chunk, "`@reason`"), "`@reason` is only read on `forbid` policies")
            )
        elif reason is not None and reason not in FORBID_REASONS:
            allowed = ", ".join(f"`{r}`" for r in FORBID_REASONS)
            problems.append(
                PolicyProblem(name, _line_of(chunk, f"`{reason}`"), f'`@reason("{reason}")` is not one of {allowed}')
            )
        position = first_index + index
        infos.append(PolicyInfo(f"policy{position}", position, policy_id, policy.effect, reason, name, chunk.start))
    result = cedarpy.validate_policies(text, schema)
    seen: set[tuple[int, str]] = set()
    for error in result.errors:
        chunk = chunk_of.get(error.policy_id) or (chunks[0] if chunks else _Chunk(1, (1, 1), text))
        message = error.error
        for local_id, policy_id in local_ids.items():
            message = message.replace(f"`{local_id}`", f"`{policy_id}`")
        line = _line_of(chunk, error.error)
        if (line, message) not in seen:
            seen.add((line, message))
            problems.append(PolicyProblem(name, line, message))
    literals = {(str(uid.type), uid.id) for uid in pst.entity_uids(tree)}
    renamed = [dataclasses.replace(policy, id=info.cedar_id) for (_, policy), info in zip(policies, infos, strict=True)]
    return infos, renamed, literals, problems


def _admits(policy: pst.Template, action: str) -> bool:
    """Whether the policy's action scope can match `action`."""
    # INVARIANT: the schema declares no action groups, so `action in [A, B]` means `action` is A or B.
    scope = policy.action
    if isinstance(scope, pst.ActionEq):
        return scope.entity.id == action
    if isinstance(scope, pst.ActionIn):
        return any(entity.id == action for entity in scope.entities)
    return True


def compile_policies(sources: Sequence[tuple[str, str]], schema: cedarpy.Schema) -> PolicyBundle:
    """Parse and validate `(file name, text)` pairs into one set; `PolicyError` lists every problem."""
    problems: list[PolicyProblem] = []
    infos: list[PolicyInfo] = []
    templates: list[pst.Template] = []
    literals: set[tuple[str, str]] = set()
    for name, text in sources:
        file_infos, file_policies, file_literals, file_problems = _check_file(name, text, schema, len(infos))
        infos.extend(file_infos)
        templates.extend(file_policies)
        literals |= file_literals
        problems.extend(file_problems)
    seen: dict[str, PolicyInfo] = {}
    for info in infos:
        if info.id in seen:
            first = seen[info.id]
            problems.append(
                PolicyProblem(info.file, info.line, f'`@id("{info.id}")` is already used at {first.file}:{first.line}')
            )
        seen.setdefault(info.id, info)
    if problems:
        raise PolicyError(problems)
    policy_set = cedarpy.PolicySet.from_str("\n".join(text for _, text in sources))
    # INVARIANT: Cedar numbers the combined set's policies in text order, as `infos` does.
    if len(policy_set) != len(infos):
        raise PolicyError(
            [PolicyProblem(sources[0][0] if sources else "(none)", 1, "policy files do not combine into one set")]
        )
    # Cedar spends time on every policy of the set, matching or not; each action gets only
    # those its scope admits, under the same ids, so decisions and diagnostics are unchanged.
    by_action = {
        action: cedarpy.PolicySet.from_pst(
            pst.PolicySet(
                templates={}, static_policies={t.id: t for t in templates if _admits(t, action)}, template_links=()
            )
        )
        for action in ACTIONS
    }
    return PolicyBundle(policy_set, by_action, {i.cedar_id: i for i in infos}, frozenset(literals), tuple(sources))
