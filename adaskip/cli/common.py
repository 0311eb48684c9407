"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from adaskip.errors import AdaskipError, InputError


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adaskip never reaches the hub
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


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
