"""Build a :class:`Config` from YAML and ``key=value`` overrides, with errors that say what to fix."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from gspo.config.schema import Config
from gspo.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config from an optional YAML file, then dotted ``key=value`` overrides, validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
    config = from_dict(raw)
    from gspo.config.validate import validate

    validate(config)
    return config


def from_dict(raw: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict; unknown keys and bad types raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key)))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{key}' is a section; set its fields, e.g. {prefix}{key}.<field>=...")
            kwargs[key] = from_dict(value, hint, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, hint, prefix + key)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            if type(None) in options:
                return None
        inner = [o for o in options if o is not type(None)]
        return coerce(value, inner[0], key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' takes a list (comma-separated on the command line), got {value!r}")
        return [coerce(v, item_type, key) for v in value]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{key}' must be {_type_name(hint)}, got {value!r}") from None
    return value


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, documentation) for every leaf field, in declaration order."""
    docs = _attribute_docstrings(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, prefix=f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, _type_name(hint), getattr(defaults, f.name), docs.get(f.name, "")))
    return rows


def all_keys() -> list[str]:
    return [row[0] for row in field_docs()]


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass (its documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "none"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _unknown_key_message(key: str) -> str:
    keys = all_keys() + [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a misspelt leaf name under the right or wrong section: match on the last part
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Run 'gspo train --help' for every key and its default."


def _split_override(item: str) -> tuple[str, Any]:
    if item.startswith("--"):
        raise ConfigError(
            f"'{item}': options are written key=value (e.g. optim.lr=1e-4), not --key value; "
            "the only flags are --help, --resume and --nproc"
        )
    if "=" not in item:
        raise ConfigError(f"'{item}' is not key=value; write e.g. steps=100 or rollout.group_size=8")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"'{item}' has an empty key; write e.g. steps=100")
    try:  # YAML scalars: numbers, booleans, lists in [a, b] form
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, dict):  # "a: b" in a value is text, not a mapping
        parsed = value
    return key, parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{key}': '{part}' is not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file or only key=value overrides")
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; to resume a run use --resume {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, not {type(raw).__name__}")
    return raw

