"""Helpers shared by the typed config dataclasses: field docstrings and argparse generation.

Config classes are flat dataclasses whose fields each carry a docstring (a string literal right after
the field). The CLI is generated from them, so the help text and the Python API never drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written below it in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        stmts = body.body
        for i, stmt in enumerate(stmts[:-1]):
            nxt = stmts[i + 1]
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] / X | None down to X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field, typed and documented from the class."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif tp in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=tp, default=default, help=help_text)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            parser.add_argument(flag, dest=f.name, choices=choices, default=default, help=help_text)
        else:
            raise TypeError(f"config field {cls.__name__}.{f.name} has unsupported CLI type {tp!r}")


def dataclass_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build a config dataclass from parsed arguments (fields absent from the namespace keep defaults)."""
    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}  # type: ignore[arg-type]
    return cls(**kwargs)


def check_ranges(cfg: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = ()) -> None:
    """One-line :class:`FeatureLensError` naming the first field out of range: ``positive`` (> 0),
    ``non_negative`` (>= 0) or ``fractions`` (in [0, 1]); the flag is spelled as on the command line."""
    from featurelens.errors import FeatureLensError, UsageError

    def bad(name: str, want: str) -> FeatureLensError:
        return UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is invalid: it must be {want}")

    for name in positive:
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and v > 0 and v == v and v != float("inf")):
            raise bad(name, "a positive number (> 0)")
    for name in non_negative:
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
            raise bad(name, "a non-negative number (>= 0)")
    for name in fractions:
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise bad(name, "between 0 and 1")


def check_device(device: str) -> None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; anything else is a one-line error."""
    import re

    from featurelens.errors import UsageError

    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", device):
        raise UsageError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or auto")
