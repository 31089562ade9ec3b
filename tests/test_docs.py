"""Every setting and every command-line flag is documented in the README."""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from idgate.cli import _parser
from idgate.config import Config

README = (Path(__file__).parent.parent / "README.md").read_text()


def _model_of(annotation: object) -> tuple[type[BaseModel] | None, bool]:
    """The config model inside an annotation, and whether it sits in a list."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (tuple, list):
        inner, _ = _model_of(args[0])
        return inner, True
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in args:
            inner, listed = _model_of(arg)
            if inner is not None:
                return inner, listed
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        inner, listed = _model_of(field.annotation)
        if inner is not None and inner.__name__ != "SecretRef":
            keys += _keys(inner, f"{path}[]." if listed else f"{path}.")
        else:
            keys.append(path)
    return keys


def _documented(key: str) -> bool:
    """The key itself, or a nested list it belongs to (documented with its fields), is in the README."""
    if f"`{key}`" in README:
        return True
    parts = key.split("[].")
    return any(f"`{'[].'.join(parts[:i])}`" in README for i in range(2, len(parts)))


def test_every_config_key_is_in_the_readme() -> None:
    keys = _keys(Config)
    assert "providers[].timeout.read" in keys and "issuers[].claims.kind_rules[].kind" in keys
    missing = [k for k in keys if not _documented(k)]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_cli_flag_is_in_the_readme() -> None:
    parser = _parser()
    missing = []

    def walk(p: argparse.ArgumentParser, words: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    command = f"{words} {name}".strip()
                    if f"idgate {command}" not in README:
                        missing.append(f"idgate {command}")
                    walk(sub, command)
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and not re.search(rf"`[^`]*{flag}\b", README):
                    missing.append(f"{words} {flag}")

    walk(parser, "")
    assert not missing, f"undocumented commands or flags: {missing}"
