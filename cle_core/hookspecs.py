"""The hooks a CLE backend plugin implements.

A backend is a pluggy plugin: a module or object with functions marked
``@cle_core.hookimpl``. Every backend, the built-in ones included, announces itself in
the ``cle.backends`` entry-point group::

    [project.entry-points."cle.backends"]
    mybackend = "my_package.cle_plugin"

Every hook name starts with ``cle_``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._backend import Backend

PROJECT_NAME = "cle"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def cle_backend_for(model: Any) -> Backend | None:
    """Return a :class:`cle_core.Backend` for ``model`` if this plugin owns its type,
    else None.

    Called for every model until one plugin answers, so it must be cheap and must not
    import a heavy framework just to say no (check ``sys.modules`` first: a model of a
    framework that was never imported cannot be one of its objects).
    """


@hookspec(firstresult=True)
def cle_backend_for_file(path: Path) -> Backend | None:
    """Return a :class:`cle_core.Backend` that reads and writes the model file ``path``
    (judged by its suffix or its first bytes), else None. The command line finds
    backends through this hook. Must be cheap, like :func:`cle_backend_for`."""


@hookspec
def cle_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add commands to the ``cle`` command line: ``subparsers.add_parser(...)``, with
    ``set_defaults(run=function)``; ``function(args)`` returns the exit status."""
