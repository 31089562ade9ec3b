"""Policy files refused at start with file, line and Cedar's message; annotations read."""

from __future__ import annotations

from pathlib import Path

import pytest

from idgate.errors import ConfigError
from idgate.policy import PolicyError, PolicyStore
from tests.policy.conftest import MakeStore

GOOD = """// tenant rules
@id("entitled")
permit (principal, action == Action::"invoke_model", resource)
when { principal in resource.entitlements };
"""


def refusal(make_store: MakeStore, *texts: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        make_store(*texts)
    return info.value


def test_a_policy_that_fails_schema_validation_is_refused_with_file_and_line(make_store: MakeStore) -> None:
    bad = (
        GOOD
        + """
@id("tenant-isolation")
@reason("tenant")
forbid (principal, action, resource)
unless { resource.tenat == principal.tenant };
"""
    )
    error = refusal(make_store, bad)
    problem = error.locations[0]  # Cedar reports it once per resource type the policy applies to
    assert {p.line for p in error.locations} == {9}
    assert problem.file.endswith("p0.cedar")
    assert problem.line == 9  # the line holding `tenat`
    assert "attribute `tenat`" in problem.message
    assert "`tenant-isolation`" in problem.message  # not Cedar's internal `policy1`
    assert str(problem) == f"{problem.file}:9: {problem.message}"
    assert isinstance(error, ConfigError)  # so `idgate config check` and start-up report it


def test_a_parse_error_is_placed_on_its_line(make_store: MakeStore) -> None:
    missing_semicolon = GOOD.rstrip().rstrip(";") + '\n\n@id("second")\npermit (principal, action, resource);\n'
    [problem] = refusal(make_store, missing_semicolon).locations
    assert problem.line == 6  # where `@id("second")` makes the unfinished policy invalid
    assert "unexpected token" in problem.message


def test_an_unterminated_string_is_placed_on_its_line(make_store: MakeStore) -> None:
    text = GOOD + '\npermit (principal, action, resource)\nwhen { principal.tenant == "acme };\n'
    [problem] = refusal(make_store, text).locations
    assert problem.line == 7


def test_an_error_in_the_second_file_names_that_file(make_store: MakeStore) -> None:
    other = 'permit (principal, action == Action::"invoke_model", resource)\nwhen { context.nope };\n'
    [problem] = refusal(make_store, GOOD, other).locations
    assert problem.file.endswith("p1.cedar")
    assert problem.line == 2
    assert "`nope`" in problem.message


def test_every_validation_problem_is_listed(make_store: MakeStore) -> None:
    text = (
        'permit (principal, action == Action::"invoke_model", resource) when { context.one };\n'
        'permit (principal, action == Action::"invoke_model", resource) when { context.two };\n'
    )
    problems = refusal(make_store, text).locations
    assert [p.line for p in problems] == [1, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('@reason("because") forbid (principal, action, resource);', "is not one of"),
        ('@reason("tenant") permit (principal, action, resource);', "only read on `forbid`"),
        ("permit (principal == ?principal, action, resource);", "templates"),
        ('@id("entitled") forbid (principal, action, resource);', "already used at"),
    ],
)
def test_annotations_and_templates_are_checked(make_store: MakeStore, text: str, message: str) -> None:
    [problem] = refusal(make_store, GOOD, "\n" + text).locations
    assert problem.file.endswith("p1.cedar")
    assert problem.line == 2
    assert message in problem.message


def test_policies_without_an_id_are_named_by_file_and_line(make_store: MakeStore) -> None:
    store = make_store(GOOD, "\n\npermit (principal, action, resource);\n")
    ids = [info.id for info in store.snapshot.policies.info.values()]
    assert ids[0] == "entitled"
    assert ids[1].endswith("p1.cedar:3")


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        PolicyStore([tmp_path / "nope.cedar"])
    assert "nope.cedar: cannot be read" in str(info.value)


def test_no_policy_files_is_refused() -> None:
    with pytest.raises(ConfigError, match="no policy files"):
        PolicyStore([])
