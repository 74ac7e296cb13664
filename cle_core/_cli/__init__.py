"""The ``cle`` command line.

Exit status: 0 on success; 2 on bad usage or bad input (one line on stderr, no
traceback unless ``--debug``, nothing written); 1 when ``--check`` finds that the output
does not compute what the input does, or on an internal error; 130 on Ctrl-C and 143 on
SIGTERM (temporary files removed, the destination untouched); 141, silently, when the
reader of stdout goes away (``| head``). Warnings (a broken plugin
skipped, a command name refused) are one ``cle: warning: ...`` line each on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from .._backend import call_hook, describe, plugin_label, plugins, warn
from .._errors import CLEError
from . import equalize, evaluate, inspect
from ._common import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE_CLOSED,
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
    "add_plugin_commands",
    "build_parser",
    "check_failed",
    "format_inspection",
    "format_summary",
    "main",
]


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines, what is wrong and where the help is: argparse's own
    repeats the usage block first (nine lines for ``cle equalize``), which hides the
    error. Subcommands' parsers are of this class too (argparse makes them so)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\ntry '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cle",
        description="Exact cross-layer equalization: fold batch norms, balance per-channel "
        "weight ranges across layers, absorb high biases, and report what was done.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # Plugins load first: an objective or a quantizer profile they register is then a
    # choice of the built-in commands too.
    plugins()
    for command in (equalize, evaluate, inspect):  # one module per command
        command.add_parser(sub)
    add_plugin_commands(sub)
    return parser


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Each plugin's ``cle_add_commands``, one plugin at a time in claim order: a plugin
    whose hook raises adds no command (one warning), and a command name that is taken
    (a built-in command's, or an earlier plugin's) is refused (one warning), so that no
    plugin can break or replace another's command."""
    owners = dict.fromkeys(sub.choices, "a built-in command")
    for name, _ in plugins():
        commands = _PluginCommands(sub, plugin_label(name), owners)
        try:
            call_hook("cle_add_commands", name, subparsers=commands)
        except Exception as exc:
            commands.remove_added()
            warn(
                f"{plugin_label(name)}: cle_add_commands failed, its commands are left out: "
                f"{describe(exc)}",
                exc,
            )


class _PluginCommands:
    """The subparsers as one plugin's ``cle_add_commands`` sees them. A name that is taken
    is refused here: argparse would silently replace the command before Python 3.11 and
    raise from 3.11 on, taking every other command down with it."""

    def __init__(self, sub: argparse._SubParsersAction, label: str, owners: dict[str, str]):
        self._sub = sub
        self._label = label
        self._owners = owners  # command name or alias -> who added it
        self._added: list[str] = []

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        names = [name, *kwargs.get("aliases", ())]
        for taken in names:
            if taken in self._owners:
                warn(
                    f"command {taken!r} of {self._label} refused: the name is taken by "
                    f"{self._owners[taken]}"
                )
                # The plugin goes on configuring a parser that no command line reaches.
                return argparse.ArgumentParser(prog=f"cle {name}")
        parser = self._sub.add_parser(name, **kwargs)
        for added in names:
            self._owners[added] = self._label
            self._added.append(added)
        return parser

    def remove_added(self) -> None:
        """Take back the commands this plugin added (its hook raised after adding some).
        argparse has no public way to remove a command: these are its two records."""
        for added in self._added:
            self._sub._name_parser_map.pop(added, None)
            self._owners.pop(added, None)
        self._sub._choices_actions[:] = [
            a for a in self._sub._choices_actions if a.dest not in self._added
        ]
        self._added.clear()

    def __getattr__(self, attr: str):
        return getattr(self._sub, attr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Plugins load while the parser is built, before the arguments are parsed.
    with _warnings_on_stderr(debug="--debug" in argv):
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


@contextlib.contextmanager
def _warnings_on_stderr(debug: bool):
    """The ``cle_core`` logger's warnings (a plugin skipped, a fallback taken) as one
    ``cle: warning: ...`` line each on stderr; with ``--debug``, their tracebacks too."""
    log = logging.getLogger("cle_core")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("cle: warning: %(message)s"))
    level = log.level
    log.addHandler(handler)
    if debug:
        log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _main(parser, args) -> int:
    try:
        if not hasattr(args, "run"):  # every command sets it: its module's, or a backend's
            parser.error(f"unknown command {args.command}")
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe raises here, not in Python's exit
        return status
    except BrokenPipeError:
        return _pipe_closed()
    except KeyboardInterrupt:
        return _interrupted(KeyboardInterrupt())
    except Terminated:
        return _interrupted(Terminated())
    except Exception as exc:
        # A signal that lands while an extension module initializes comes out as its
        # ImportError ("initialization failed"), which may be wrapped again on the way.
        signal_exc = _signal_in(exc)
        if signal_exc is not None:
            return _interrupted(signal_exc)
        if isinstance(exc, CLEError):
            if args.debug:
                raise
            print(f"cle: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return _internal(exc, args.debug)
    return EXIT_OK


def _pipe_closed() -> int:
    """The reader of stdout went away (``cle inspect m.onnx | head``): what it wanted
    it has, so no error; stdout goes to /dev/null so that Python's own flush at exit
    does not fail again. Exit status as a shell gives for SIGPIPE."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor under pytest
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_PIPE_CLOSED


def _signal_in(exc: BaseException) -> BaseException | None:
    """A KeyboardInterrupt or Terminated among the causes and contexts of ``exc``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        print("cle: interrupted; the output was not changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("cle: terminated; the output was not changed", file=sys.stderr)
    return EXIT_TERMINATED


def _internal(exc: Exception, debug: bool) -> int:
    """A bug: said in one line, the traceback on request."""
    if debug:
        raise exc
    print(
        f"cle: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL
