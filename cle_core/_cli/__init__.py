"""The ``cle`` command line.

Exit status: 0 on success; 2 on bad usage or bad input (one line on stderr, no
traceback unless ``--debug``, nothing written); 1 when ``--check`` finds that the output
does not compute what the input does, or on an internal error; 130 on Ctrl-C and 143 on
SIGTERM (temporary files removed, the destination untouched).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .._backend import get_plugin_manager
from .._errors import CLEError
from . import equalize, evaluate, inspect
from ._common import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    Progress,
    Terminated,
    UsageError,
    _on_sigterm,
)
from .equalize import check_failed
from .inspect import format_inspection, format_summary

__all__ = [
    "Progress",
    "UsageError",
    "build_parser",
    "check_failed",
    "format_inspection",
    "format_summary",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cle",
        description="Exact cross-layer equalization: fold batch norms, balance per-channel "
        "weight ranges across layers, absorb high biases, and report what was done.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for command in (equalize, evaluate, inspect):  # one module per command
        command.add_parser(sub)
    get_plugin_manager().hook.cle_add_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(parser, args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(parser, args) -> int:
    try:
        if not hasattr(args, "run"):  # every command sets it: its module's, or a backend's
            parser.error(f"unknown command {args.command}")
        return args.run(args)
    except CLEError as exc:
        if args.debug:
            raise
        print(f"cle: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cle: interrupted; the output was not changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("cle: terminated; the output was not changed", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: say so in one line, traceback on request
        if args.debug:
            raise
        print(
            f"cle: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return EXIT_OK
