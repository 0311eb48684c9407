"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit, never a traceback; flag defaults
read from the library's options dataclasses; comma-separated list flags."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from types import SimpleNamespace
from typing import Any, Callable, NoReturn

from adaskip.model.environment import quiet_libraries
from adaskip.errors import AdaskipError, InputError, did_you_mean


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: ... (see prog --help)`, exit 2): the usage block belongs to
    --help, not to a typo. A misspelled flag gets the closest real one suggested."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            if flags:
                message += did_you_mean(flags[0], tuple(self._option_string_actions))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the description as written and each option's default, except where it says nothing: an on/off
    flag (`--no-x` stores False, so "(default: True)" would read as the flag being on) or no value (None: the help
    text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def defaults(options: type) -> Any:
    """An options dataclass's field defaults by name (`defaults(BenchOptions).repeats`): the only source of a flag's
    default, so the CLI cannot drift from the library. Fields without a default are left out."""
    values = {}
    for f in dataclasses.fields(options):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return SimpleNamespace(**values)


def joined(values: list | tuple) -> str:
    """A list default as its flag spells it (`1024,2048`)."""
    return ",".join(map(str, values))


def int_list(text: str, flag: str) -> list[int]:
    """`1024,2048` -> [1024, 2048]; empty items are skipped, anything else but an integer is refused."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} takes comma-separated integers; got {text!r}") from None


def word_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def check_utf8(argv: list[str]) -> None:
    """Python turns argv bytes that are not UTF-8 into lone surrogates, which fail much later (a traceback while
    tokenizing or printing): refuse them up front."""
    for n, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"argument {n} is not valid UTF-8: {arg.encode('utf-8', 'backslashreplace')[:80]!r}") from None


def main_wrapper(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    def deco(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def wrapped(argv: list[str] | None = None) -> int:
            quiet_libraries()
            try:
                check_utf8(sys.argv[1:] if argv is None else argv)
                return fn(argv)
            except AdaskipError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
            except OSError as e:  # disk full, permissions, ...: the environment, not a bug; say which file
                where = f" ({e.filename})" if e.filename else ""
                print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
        return wrapped
    return deco
