"""`idgate policy test`: the shipped cases pass; a wrong expectation fails non-zero with the reasons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from idgate.policy.demo import ENTITIES, MODELS, POLICY, TESTS


def policy_test(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idgate", "policy", "test", str(path)], capture_output=True, text=True, timeout=60
    )


def test_the_shipped_cases_pass() -> None:
    result = policy_test(TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


def test_a_wrong_expectation_fails_with_the_reasons(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        f"policies: [{POLICY}]\n"
        f"entities: [{ENTITIES}, {MODELS}]\n"
        "cases:\n"
        "  - name: a cross-tenant call that someone thought was fine\n"
        "    caller: {id: eve, tenant: beta}\n"
        "    action: invoke_model\n"
        "    resource: {model: acme-chat}\n"
        "    expect: allow\n"
    )
    result = policy_test(wrong)
    assert result.returncode == 1
    assert "FAIL a cross-tenant call" in result.stdout and "tenant" in result.stdout
    assert "0 passed, 1 failed" in result.stdout


def test_config_check_validates_the_policies_it_names(tmp_path: Path) -> None:
    (tmp_path / "bad.cedar").write_text(
        '@id("x")\npermit (principal, action, resource)\nwhen { resource.tenat == "x" };\n'
    )
    (tmp_path / "idgate.yaml").write_text("dev_issuer: {enabled: true}\npolicy: {files: [bad.cedar]}\n")
    result = subprocess.run(
        [sys.executable, "-m", "idgate", "config", "check", str(tmp_path / "idgate.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"IDGATE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.cedar'}:3:" in result.stderr and "`tenat`" in result.stderr
