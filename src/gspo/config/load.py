"""Build a :class:`Config` from YAML and ``key=value`` overrides, with errors that say what to fix.

Values reach :func:`coerce` as the text the user wrote, from the command line and from YAML files
alike (YAML is read without implicit typing, :class:`_TextLoader`), and become the field's type
there: a string field keeps ``off``, ``on``, ``yes``, ``no``, ``none`` or ``null`` exactly as written
(YAML 1.1 would have made ``moe.routing_replay: off`` the boolean False).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from gspo.config.schema import AUTO, AUTO_KEYS, SWITCH_KEYS, Config
from gspo.errors import ConfigError
from gspo.suggest import closest, trl_hint

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}  # what an optional (``X | None``) field reads as None
# The embedded model names (gspo.models.load.EMBEDDED maps them to directories; kept equal by a test),
# here so that a misspelt model= is answered before torch is imported.
EMBEDDED_MODELS = ("tiny-arith", "tiny-moe", "tiny-calc")  # tiny-calc: the agent task's


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config from an optional YAML file, then dotted ``key=value`` overrides, validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
    config = from_dict(raw)
    check_model(config.model)
    from gspo.config.validate import validate

    validate(config)
    return config


def check_model(model: str) -> None:
    """A ``model`` that is neither an embedded name nor an existing path is a typo or a missing directory."""
    if model in EMBEDDED_MODELS or Path(model).expanduser().exists():
        return
    match = closest(model, EMBEDDED_MODELS)
    hint = f" Did you mean '{match}'?" if match else ""
    raise ConfigError(f"model '{model}' is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an "
                      f"existing directory.{hint} Pass model=<local Hugging Face model directory> "
                      "(nothing is downloaded)")


def from_dict(raw: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict; unknown keys and bad types raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(unknown_key_message(prefix + str(key)))
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
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in options:
                return None
        inner = [o for o in options if o is not type(None)]
        return coerce(value, inner[0], key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):  # the YAML flow form, [a, b]
                text = text[1:-1]
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
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
            if key in AUTO_KEYS and isinstance(value, str) and value.strip().lower() == "auto":
                return AUTO
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():  # 1e3
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError
            if key in SWITCH_KEYS:  # auto | true | false, any spelling of a boolean included
                text = str(value).strip().lower()
                return "auto" if text == "auto" else str(text in _TRUE).lower() if text in _TRUE | _FALSE else text
            if isinstance(value, bool):  # a YAML 1.1 boolean from a caller's own yaml.safe_load
                raise ConfigError(f"'{key}' is a string field, got the boolean {value}; write the word in quotes "
                                  f"('{key}: \"off\"') or load the file with gspo.config.load_config") from None
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
    return list(_leaf_keys())


def is_config_key(key: str) -> bool:
    """Whether ``key`` names a config field or section (``optim.lr``, ``optim``)."""
    return key in _leaf_keys() or key in _section_names()


@functools.lru_cache(maxsize=1)
def _leaf_keys() -> tuple[str, ...]:
    return tuple(row[0] for row in field_docs())


@functools.lru_cache(maxsize=1)
def _section_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(Config))


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


def unknown_key_message(key: str, *, extra: list[str] = (), help_command: str = "train") -> str:
    """``unknown config key 'optim.lrr'. Did you mean 'optim.lr'?``; ``extra``: a command's own keys."""
    trl = trl_hint(key)  # a TRL GRPOConfig name: point at gspo's key for it
    if trl:
        return f"unknown config key '{key}'.{trl} Run 'gspo {help_command} --help' for every key and its default."
    keys = [*extra, *_leaf_keys(), *sorted(_section_names())]
    match = closest(key, keys)
    if match is None:  # a misspelt leaf name under the right or wrong section: match on the last part
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaf_match = closest(leaf, list(by_leaf))
        match = by_leaf[leaf_match] if leaf_match else None
    hint = f" Did you mean '{match}'?" if match else ""
    return f"unknown config key '{key}'.{hint} Run 'gspo {help_command} --help' for every key and its default."


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
    return key, value  # the text as written; coerce() gives it the field's type


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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_TextLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, not {type(raw).__name__}")
    return raw


class _TextLoader(yaml.SafeLoader):
    """YAML without implicit typing: every plain scalar stays the text written (``off`` is "off", ``7`` is
    "7"); mappings and lists keep their shape. :func:`coerce` then types each value by its field, the
    same way as a command-line value, so a file and ``key=value`` can never disagree."""


# SafeLoader's resolvers turn off/on/yes/no into booleans and ~/null into None; drop them all, so that
# every plain scalar resolves to the str tag (quoted scalars always did).
_TextLoader.yaml_implicit_resolvers = {}
