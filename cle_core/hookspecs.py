"""The hooks a CLE backend plugin implements.

A backend is a pluggy plugin: a module or object with functions marked
``@cle_core.hookimpl``. Every backend, the built-in ones included, announces itself in
the ``cle.backends`` entry-point group::

    [project.entry-points."cle.backends"]
    mybackend = "my_package.cle_plugin"

Every hook name starts with ``cle_``.

Each plugin is loaded and asked on its own, so that a broken plugin costs only itself
(:func:`cle_core.get_plugin_manager`). The core calls the hooks one plugin at a time, in
*claim order*: the built-in backends (the entry points of the ``crosslayer-eq``
distribution) first, then third-party plugins sorted by entry-point name; the first
backend returned wins. The order on ``sys.path`` and pluggy's ``tryfirst`` / ``trylast``
markers do not change it, and hook wrappers are not called. Third-party entry points
cannot take a built-in backend's name.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._backend import Backend, FileBackend

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

    Raising a :class:`cle_core.CLEError` claims the model and refuses it: its message
    reaches the user. Any other exception, or an answer that is not a ``Backend``, is a
    bug of the plugin: it is skipped for this model with a warning, and the next plugin
    is asked.
    """


@hookspec(firstresult=True)
def cle_backend_for_file(path: Path) -> FileBackend | None:
    """Return a :class:`cle_core.FileBackend` that reads and writes the model file ``path``
    (judged by its suffix or its first bytes), else None. The command line finds
    backends through this hook. Must be cheap, and fails like :func:`cle_backend_for`
    (raise a ``CLEError`` for a file that is yours but cannot be read: the ONNX backend
    without onnx installed).

    A plugin whose backends read files names their suffixes in a module attribute
    ``suffixes`` (``(".onnx",)``): the error for a file that no backend reads lists
    them."""


@hookspec
def cle_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add commands to the ``cle`` command line: ``subparsers.add_parser(...)``, with
    ``set_defaults(run=function)``; ``function(args)`` returns the exit status.

    Called for each plugin in claim order. A name that is taken (a built-in command's or
    an earlier plugin's) is refused with a warning: ``add_parser`` then returns a parser
    that no command line reaches. If the hook raises, none of its commands are added."""
