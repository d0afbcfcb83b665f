"""The one command-line grammar every ``gspo`` subcommand parses with.

``gspo <command> [POSITIONAL ...] [key=value ...] [--flag VALUE ...]``:

- positionals (a config file, a run directory, an output directory) in the order the command names them;
- options as ``key=value``; a command declares its own keys, and ``train`` / ``eval`` also take every
  dotted config key (``optim.lr=1e-4``), checked by :mod:`gspo.config.load`;
- the few ``--`` flags a command declares (``--resume RUN``, ``--nproc N``), as ``--flag VALUE`` or
  ``--flag=VALUE``, and ``--help`` / ``-h`` everywhere.

A typo in a key, a flag or a command gets the closest valid name (:mod:`gspo.suggest`). Parsing imports
only the standard library and, for config keys, the config schema: no torch.
"""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gspo.errors import ConfigError
from gspo.suggest import closest, did_you_mean

HELP_FLAGS = ("-h", "--help")
KEY_PATTERN = re.compile(r"^[A-Za-z_][\w.\-]*$")  # what may stand before '=' (paths hold '/', so never match)
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NBSP = "\u00a0"
HELP_WIDTH_DEFAULT = 80  # help text wraps to the terminal; this when there is none (a pipe, a file)
HELP_WIDTH_RANGE = (40, 100)  # narrower is unreadable, wider lines are hard to follow


class UsageError(ConfigError):
    """A command line that does not fit the command's grammar (exit code 2, like every ConfigError)."""


@dataclass(frozen=True)
class Option:
    """A ``key=value`` option of one command. ``kind``: str, int, ints (comma-separated), bool."""

    key: str
    default: str
    help: str
    kind: str = "str"
    minimum: int = 0
    """Smallest whole number an int / ints option takes."""


@dataclass(frozen=True)
class Flag:
    """A ``--name VALUE`` flag. ``alias_of``: a deprecated spelling of the ``key=value`` option of that key."""

    name: str
    metavar: str
    help: str
    alias_of: str = ""


@dataclass(frozen=True)
class Command:
    """What one subcommand accepts; :func:`parse` reads a command line against it, :func:`render_help` explains it."""

    name: str
    summary: str
    positionals: tuple[tuple[str, str], ...] = ()
    """(METAVAR, meaning) in order."""
    required: int = 0
    """How many leading positionals must be given."""
    options: tuple[Option, ...] = ()
    flags: tuple[Flag, ...] = ()
    config_keys: bool = False
    """Also accept every ``gspo train`` config key as ``key=value``."""
    free_keys: bool = False
    """Pass every other ``key=value`` on unchecked (to code that checks its own keys, e.g. an experiment)."""
    description: str = ""

    @property
    def usage(self) -> str:
        parts = [f"gspo {self.name}"]
        for i, (metavar, _) in enumerate(self.positionals):
            parts.append(metavar if i < self.required else f"[{metavar}]")
        if self.options or self.config_keys or self.free_keys:
            parts.append("[key=value ...]")
        parts += [f"[{f.name} {f.metavar}]" for f in self.flags if not f.alias_of]
        return " ".join(parts)


@dataclass
class Parsed:
    """A parsed command line: positionals, the command's own options (typed), config overrides, flags."""

    positionals: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    """``key=value`` config overrides, as written, in order (for :func:`gspo.config.load_config`)."""
    flags: dict[str, str] = field(default_factory=dict)
    help: bool = False

    def positional(self, index: int, default: str | None = None) -> str | None:
        return self.positionals[index] if index < len(self.positionals) else default


def parse(command: Command, argv: list[str]) -> Parsed:
    """Read ``argv`` (the words after the command name) against ``command``; raises :class:`UsageError`."""
    if any(arg in HELP_FLAGS for arg in argv):
        return Parsed(help=True)
    parsed = Parsed(options={o.key: _convert(o, o.default) for o in command.options if o.default != ""})
    words = list(argv)
    while words:
        arg = words.pop(0)
        if arg.startswith("-") and len(arg) > 1:
            _take_flag(command, arg, words, parsed)
        elif "=" in arg and KEY_PATTERN.match(arg.split("=", 1)[0]):
            _take_option(command, arg, parsed)
        elif arg.startswith("="):
            raise UsageError(f"'{arg}' has an empty key; write key=value, e.g. {_example(command)}")
        elif _is_key(command, arg) and not Path(arg).exists():  # "steps 3": a key and its value split by a space
            value = words[0] if words and "=" not in words[0] and not words[0].startswith("-") else "..."
            raise UsageError(f"'{arg}' is an option: write it key=value, e.g. {arg}={value}")
        elif len(parsed.positionals) < len(command.positionals):
            parsed.positionals.append(arg)
        else:
            raise UsageError(_stray_word_message(command, arg, words))
    if len(parsed.positionals) < command.required:
        missing = command.positionals[len(parsed.positionals)][0]
        raise UsageError(f"missing {missing}. Usage: {command.usage} (gspo {command.name} --help explains it)")
    return parsed


def help_width() -> int:
    """The width help text wraps to: the terminal's (``COLUMNS`` first), 80 without a terminal, kept in
    :data:`HELP_WIDTH_RANGE`."""
    low, high = HELP_WIDTH_RANGE
    return min(high, max(low, shutil.get_terminal_size((HELP_WIDTH_DEFAULT, 24)).columns))


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """``text`` as lines of at most ``width`` columns, each starting with ``indent``; blank lines separate
    paragraphs, single line breaks inside one are reflowed."""
    out: list[str] = []
    for paragraph in text.split("\n\n"):
        out += textwrap.wrap(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False) or [""]
        out.append("")
    return out[:-1]


def fit(text: str, width: int | None = None) -> str:
    """Preformatted help (an experiment's table of options) with each line over ``width`` wrapped under its
    own indentation (default width: :func:`help_width`)."""
    width = width or help_width()
    out = []
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()))
        hanging = indent + "    " if indent else ""  # an option's continuation, or prose
        out += textwrap.wrap(line, width, subsequent_indent=hanging, break_on_hyphens=False) or [""]
    return "\n".join(out)


def render_help(command: Command, extra: list[str] = (), width: int | None = None) -> str:
    """``gspo <command> --help``: usage, what it does, its arguments, options and flags, wrapped to ``width``
    (default :func:`help_width`)."""
    width = width or help_width()
    usage = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" ", NBSP), command.usage)  # keep [a b] whole
    lines = [*(line.replace(NBSP, " ") for line in textwrap.wrap(f"usage: {usage}", width, subsequent_indent="    ",
                                                                 break_on_hyphens=False)), ""]
    if command.description or command.summary:
        lines += [*wrap(command.description or command.summary, width), ""]
    rows = [(metavar, meaning) for metavar, meaning in command.positionals]
    if rows:
        lines += ["arguments:", *_table(rows, width), ""]
    if command.options:
        lines += ["options (key=default, meaning):",
                  *_table([(f"{o.key}={o.default or '...'}", o.help) for o in command.options], width), ""]
    flags = [(f"{f.name} {f.metavar}", f.help) for f in command.flags if not f.alias_of]
    lines += ["flags:", *_table(flags + [("--help", "show this help and exit")], width)]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines)


def _table(rows: list[tuple[str, str]], line_width: int = HELP_WIDTH_DEFAULT) -> list[str]:
    """Two aligned columns; the right one wrapped to ``line_width``."""
    width = min(max(len(left) for left, _ in rows), 24)
    out = []
    for left, right in rows:
        wrapped = textwrap.wrap(right, max(20, line_width - width - 4), break_on_hyphens=False) or [""]
        if len(left) > width:
            out.append(f"  {left}")
        else:
            out.append(f"  {left:{width}}  {wrapped.pop(0)}")
        out += [f"  {'':{width}}  {line}" for line in wrapped]
    return out


def _take_flag(command: Command, arg: str, words: list[str], parsed: Parsed) -> None:
    name, sep, value = arg.partition("=")
    flag = next((f for f in command.flags if f.name == name), None)
    if flag is None:
        raise UsageError(_unknown_flag_message(command, name, value if sep else (words[0] if words else "")))
    if not sep:
        if not words or words[0].startswith("--"):
            raise UsageError(f"{name} needs a value, e.g. {name} {_flag_example(flag)}")
        value = words.pop(0)
    if flag.alias_of:
        print(f"gspo {command.name}: warning: {name} is deprecated; write {flag.alias_of}={value}", file=sys.stderr)
        option = next(o for o in command.options if o.key == flag.alias_of)
        parsed.options[option.key] = _convert(option, value)
        return
    parsed.flags[name] = value


def _take_option(command: Command, arg: str, parsed: Parsed) -> None:
    key, value = arg.split("=", 1)
    option = next((o for o in command.options if o.key == key), None)
    if option is not None:
        parsed.options[key] = _convert(option, value)
        return
    if command.config_keys:
        from gspo.config.load import is_config_key, unknown_key_message

        if not is_config_key(key):
            raise UsageError(unknown_key_message(key, extra=[o.key for o in command.options],
                                                 help_command=command.name))
        parsed.overrides.append(arg)
        return
    if command.free_keys:
        parsed.overrides.append(arg)
        return
    keys = [o.key for o in command.options]
    known = ", ".join(f"{k}=..." for k in keys) or "no key=value options"
    raise UsageError(f"unknown option '{key}'.{did_you_mean(key, keys)} gspo {command.name} takes {known} "
                     f"(gspo {command.name} --help explains them)")


def _convert(option: Option, value: str) -> Any:
    """The option's text as its kind, or a UsageError naming the key and what to write."""
    if option.kind == "int":
        return _whole_number(option, value)
    if option.kind == "ints":
        return tuple(_whole_number(option, v) for v in value.split(",") if v.strip())
    if option.kind == "bool":
        text = value.strip().lower()
        if text not in TRUE_WORDS + FALSE_WORDS:
            raise UsageError(f"{option.key}={value!r} must be true or false")
        return text in TRUE_WORDS
    return value


def _whole_number(option: Option, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{option.key}={value!r} must be a whole number, e.g. {option.key}={option.default or 1}") \
            from None
    if number < option.minimum:
        raise UsageError(f"{option.key}={number} must be >= {option.minimum}")
    return number


def _is_key(command: Command, word: str) -> bool:
    if any(o.key == word for o in command.options):
        return True
    if command.config_keys and KEY_PATTERN.match(word):
        from gspo.config.load import is_config_key

        return is_config_key(word)
    return False


def _unknown_flag_message(command: Command, name: str, value: str) -> str:
    flags = [f.name for f in command.flags] + ["--help"]
    key = name.lstrip("-").replace("-", "_")
    if _is_key(command, key):  # --steps 3: the argparse habit
        example = f"{key}={value}" if value and not value.startswith("-") else f"{key}=..."
        return (f"'{name}': options are written key=value ({example}), not --key value; "
                f"the flags of gspo {command.name} are {', '.join(flags)}")
    match = closest(name, flags)
    hint = f" Did you mean '{match}'?" if match else ""
    return (f"unknown flag '{name}'.{hint} Options are written key=value (e.g. {_example(command)}); "
            f"the flags of gspo {command.name} are {', '.join(flags)}")


def _stray_word_message(command: Command, arg: str, rest: list[str]) -> str:
    takes = " ".join(m for m, _ in command.positionals) or "no positional arguments"
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        example = f"{arg}={rest[0]}"  # "samples 8": the key and its value, split by a space
    else:
        example = _example(command)
    return (f"'{arg}' is not key=value (gspo {command.name} takes {takes}, then key=value options); "
            f"write e.g. {example}")


def _example(command: Command) -> str:
    if command.options:
        option = command.options[0]
        return f"{option.key}={option.default or '...'}"
    return "steps=100 or rollout.group_size=8" if command.config_keys else "key=value"


def _flag_example(flag: Flag) -> str:
    return {"RUN": "runs/my-run", "N": "2"}.get(flag.metavar, flag.metavar)
