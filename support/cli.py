"""Command lines from dataclasses: a flag's default, its help and its check sit together, in the field that holds it.

    @dataclass
    class Config:
        steps: int = arg(100, "optimizer steps, one rollout batch each", positive_int)

    parser = dataclass_parser(Config, __doc__)   # --steps N, checked by positive_int when the command is parsed
    explicit_flags(Config, ["--ste", "5"])       # {"steps"}: the fields typed on the command line

A bool field is a store_true flag; any other takes a value read by the field's `kind` (an argparse type such as
`positive_int`, which rejects a bad number when the command is parsed, before any model loads) or its annotation.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import field, fields


def arg(default, help: str, kind=None, choices=None, group: str | None = None, **argparse_kw):
    """A dataclass field with its --help text beside its default; `kind` reads the command line's text (an argparse
    type, such as `positive_int` below), `choices` lists the values it may take; flags of one `group` exclude each
    other; the rest (`nargs`, `metavar`) goes to argparse as it is."""
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices, group=group, **argparse_kw))


def dataclass_parser(cls, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with one --flag-name per field of the dataclass `cls` made with `arg` (a field made
    otherwise is no flag: the program fills it in)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}  # group name -> its mutually exclusive argparse group
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        text, kind, group = meta.pop("help"), meta.pop("kind"), meta.pop("group")
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        where = groups[group] if group else p
        if f.type == "bool":
            where.add_argument(flag, action="store_true", help=text)
            continue
        kind = kind or {"int": int, "float": float}.get(f.type.split(" | ")[0], str)  # "int | None": an int or none
        shown = "" if f.default is None else f" (default {f.default!r})"
        where.add_argument(flag, type=kind, default=f.default, help=text + shown, **meta)
    return p


def explicit_flags(cls, argv: list[str] | None) -> set[str]:
    """The fields of `cls` set on the command line `argv` (default sys.argv), argparse's unique-prefix abbreviations
    included: what the user chose, which a program filling in the rest (grpo.py's memory plan) must not change.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     steps: int = 1
    ...     seed: int = 0
    >>> sorted(explicit_flags(C, ["--ste", "5", "--seed=3", "--s", "x"]))  # --s is ambiguous: not counted
    ['seed', 'steps']
    """
    flags = {"--" + f.name.replace("_", "-"): f.name for f in fields(cls)}
    given = set()
    for token in sys.argv[1:] if argv is None else argv:
        name = token.split("=", 1)[0]
        matches = [flags[name]] if name in flags else [v for k, v in flags.items() if k.startswith(name)]
        if token.startswith("--") and len(matches) == 1:
            given |= set(matches)
    return given


# ----------------------------------------------------------------------------------------------------------------------
# argparse types: a bad value fails when the command is parsed, with argparse's "error: argument --x: ..." line


def _number(kind: type, what: str, lo: float | None = None, hi: float | None = None, above: bool = False):
    """An argparse type: `kind(text)`, finite, at least `lo` (above it when `above`), at most `hi`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        low = lo is not None and (value <= lo if above else value < lo)
        if low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording, should it ever show
    return parse


positive_int = _number(int, "a positive integer (>= 1)", lo=1)
nonneg_int = _number(int, "a non-negative integer (>= 0)", lo=0)
positive_float = _number(float, "a positive number (> 0)", lo=0.0, above=True)
nonneg_float = _number(float, "a non-negative number (>= 0)", lo=0.0)
