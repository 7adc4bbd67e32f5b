"""What a good configuration value is: the rule kinds `prx.config.FIELD_RULES` is made of.

A rule says in words what it accepts ("an integer >= 1", "a finite number in [0, 1)") and, where
the range is not obvious, why; `check_value` turns a refused value into the one-line message
`section.field=value: must be ...` that the commands print; `OneLineParser` makes argparse's own
usage mistakes the same kind of one line.
"""

from __future__ import annotations

import argparse
import math
import operator
import os
import typing
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what to do."""


@dataclass(frozen=True)
class Rule:
    description: str  # what a good value is: "an integer >= 1"
    accepts: typing.Callable[[typing.Any], bool]
    why: str = ""  # the reason, where the range is not obvious


_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _bounded(kind: str, is_kind, gt, ge, lt, le, why: str) -> Rule:
    bounds = [(op, b) for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    if len(bounds) == 2:  # a low and a high bound: interval notation
        (low_op, low), (high_op, high) = bounds
        text = f"{kind} in {'(' if low_op == '>' else '['}{low}, {high}{')' if high_op == '<' else ']'}"
    else:
        text = kind + "".join(f" {op} {b}" for op, b in bounds)
    return Rule(text, lambda v: is_kind(v) and all(_COMPARE[op](v, b) for op, b in bounds), why)


def integer(gt=None, ge=None, lt=None, le=None, even=False, why="") -> Rule:
    """An int (a bool is not one) within the bounds given; `even`: a multiple of 2."""
    return _bounded("an even integer" if even else "an integer",
                    lambda v: isinstance(v, int) and not isinstance(v, bool) and not (even and v % 2),
                    gt, ge, lt, le, why)


def number(gt=None, ge=None, lt=None, le=None, why="") -> Rule:
    """A finite float or int within the bounds given: never NaN or inf."""
    return _bounded("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v), gt, ge, lt, le, why)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(choices), lambda v: v in choices)


def _has_prompt(path: str) -> bool:
    try:
        return any(line.strip() for line in Path(path).read_text().splitlines())
    except (OSError, UnicodeDecodeError):
        return False


def writable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a directory this process writes, or None; creates nothing."""
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    return None if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"


FLAG = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str))
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
WRITABLE_DIR = Rule("a directory that exists or can be created, and is writable",
                    lambda v: isinstance(v, str) and bool(v.strip()) and writable_dir_problem(Path(v)) is None)
PROMPT_FILE = Rule("empty, or a readable text file with at least one prompt (one a line)",
                   lambda v: isinstance(v, str) and (not v or _has_prompt(v)))
BELOW_ONE = number(ge=0, lt=1)  # a share or a decay that must stay below 1


def show(value) -> str:
    """A value as a message shows it: strings quoted, so an empty one is visible."""
    return repr(value) if isinstance(value, str) else str(value)


def check_value(name: str, value, rule: Rule) -> None:
    """ConfigError `name=value: must be ...` unless `rule` accepts `value`."""
    if not rule.accepts(value):
        detail = writable_dir_problem(Path(value)) if rule is WRITABLE_DIR and isinstance(value, str) and value else ""
        why = "; ".join(part for part in (detail, rule.why) if part)
        raise ConfigError(f"{name}={show(value)}: must be {rule.description}" + (f" ({why})" if why else ""))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage mistakes raise ConfigError, so a command's `cli` reports them as one
    line (`error: ...`, exit status 2) like every other bad value, not as usage text."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see --help)")
