"""Building typed dataclasses from plain dicts (YAML, ``key.path=value`` overrides) with type checks, and reading
each field's description from its comment.  Generic: it knows no config section (those are in ``config``).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------------------------------
# Field descriptions
# --------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Each field of config dataclass ``cls`` -> its description, read from this module's source.

    The description of a field is its trailing ``# comment``; a field without one takes the comment line(s)
    directly above it.  A field with neither maps to "" (tests/test_config_docs.py keeps that from happening).
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number in ``source`` (1-based) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update((tok.start[0], tok.end[0]))
    tree = ast.parse(source)
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    for node in tree.body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names):
            continue
        if node.end_lineno in comments:
            docs[node.target.id] = comments[node.end_lineno]
            continue
        above, n = [], node.lineno - 1
        while n in comments and n not in code_lines:
            above.insert(0, comments[n])
            n -= 1
        docs[node.target.id] = " ".join(above)
    return {name: docs.get(name, "") for name in (f.name for f in dataclasses.fields(cls))}


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and "true" in allowed:  # YAML turns `true` into a bool
            value = "true" if value else "false"
        _check(value in allowed, key, f"{value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)  # a typed list checks every element
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    return value


# Keys that moved to another section: an old config names its new place instead of only failing.
MOVED_KEYS = {"ablation.return_window_s": "prepare.return_window_s",
              "ablation.heldout_user_share": "eval.heldout_user_share"}


def from_dict(cls: type, data: dict, key: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        moved = [f" ({where + u} is now {MOVED_KEYS[where + u]})" for u in unknown if where + u in MOVED_KEYS]
        raise ConfigError(f"unknown config key(s) {[where + u for u in unknown]}{''.join(moved)}; "
                          f"known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"reward.gamma=0.8"`` -> (["reward", "gamma"], 0.8); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    k, v = text.split("=", 1)
    return k.strip().split("."), yaml.safe_load(v)


def set_path(d: dict, path: list[str], value: Any) -> None:
    """Set ``d[path[0]]...[path[-1]] = value``, making sections on the way."""
    for p in path[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
    d[path[-1]] = value
