"""Generate argparse flags from the stage config dataclasses, and build configs back from them.

Every field `some_name` becomes `--some-name`; bools get `--x/--no-x`; Literal fields get choices;
`action='append'` fields are repeatable. Defaults can come from an environment variable named in
the field's metadata (`env`), shown in the help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pipeline.core.config import env_default

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, seen: set[str] | None = None) -> None:
    """Add one argument group with a flag per field of the dataclass `cls`."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if seen is not None:
            if f.name in seen:
                continue
            seen.add(f.name)
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if f.metadata.get("env"):
            help_text += f" (env {f.metadata['env']})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.metadata.get("action") == "append":
            group.add_argument(flag, action="append", metavar="VALUE", **kwargs)
            continue
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["help"] += f" [default: {default}]"
            group.add_argument(flag, **kwargs)
            continue
        kwargs["type"] = {Path: Path, int: int, float: float}.get(tp, str)
        if default not in (None, [], ""):
            kwargs["help"] += f" [default: {default}]"
        group.add_argument(flag, metavar=f.name.upper(), **kwargs)


def config_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build `cls` from parsed flags, falling back to env-var defaults, then field defaults."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
            continue
        env = env_default(f)
        if env is not None:
            tp = _unwrap_optional(hints[f.name])
            values[f.name] = tp(env) if tp in (int, float, Path) else env
    return cls(**values)  # type: ignore[call-arg]
