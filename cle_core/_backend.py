"""The backend protocol and the plugin host."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from ._equalize import equalize
from ._errors import UnsupportedModelError
from ._ir import Graph
from ._report import EqualizeOptions, EqualizeResult, Report

ENTRY_POINT_GROUP = "cle.backends"
"""Entry-point group where every backend, the built-in ones included, registers its
plugin module."""

logger = logging.getLogger("cle_core")

_plugin_manager: pluggy.PluginManager | None = None


class Backend(ABC):
    """Translates one model format to the IR and writes an equalization result back.

    Backends hold no CLE math: :meth:`to_ir` copies parameters into a
    :class:`~cle_core.Graph` (arrays the core may replace), :meth:`apply` writes the
    changed and removed nodes of an :class:`~cle_core.EqualizeResult` back.
    """

    name: str = "backend"

    @abstractmethod
    def to_ir(self, model: Any, **options: Any) -> Graph:
        """Translate ``model`` into a graph. Never modifies ``model``."""

    @abstractmethod
    def apply(self, model: Any, result: EqualizeResult, **options: Any) -> Any:
        """Return the equalized model (``model`` itself when written in place)."""


def get_plugin_manager(reload: bool = False) -> pluggy.PluginManager:
    """The process-wide plugin manager, with every backend of the ``cle.backends``
    entry-point group loaded (the core names none). A backend whose framework is not
    installed is skipped (logged at DEBUG); a hook implementation that matches no hook
    (a misspelled name) raises :class:`pluggy.PluginValidationError`.

    ``reload=True`` builds it anew (after installing a plugin at run time)."""
    global _plugin_manager
    if _plugin_manager is None or reload:
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None:
                continue  # the same distribution found twice on sys.path
            try:
                plugin = ep.load()
            except ModuleNotFoundError as exc:
                logger.debug("backend %r skipped: %s is not installed", ep.name, exc.name)
                continue
            pm.register(plugin, name=ep.name)
        pm.check_pending()
        _plugin_manager = pm
    return _plugin_manager


def get_backend(model: Any) -> Backend:
    """The backend that claims ``model``; :class:`UnsupportedModelError` if none does."""
    pm = get_plugin_manager()
    backend = pm.hook.cle_backend_for(model=model)
    if backend is None:
        kind = type(model)
        names = ", ".join(name for name, _ in pm.list_name_plugin()) or "none"
        raise UnsupportedModelError(
            f"no CLE backend handles a model of type {kind.__module__}.{kind.__qualname__} "
            f"(registered backends: {names})"
        )
    return backend


def equalize_model(model: Any, **options: Any) -> tuple[Any, Report]:
    """Equalize a model of any format a registered backend supports.

    Keyword arguments that are :class:`EqualizeOptions` fields configure CLE; the rest
    go to the backend. Returns ``(equalized model, report)``.
    """
    cle_options, backend_options = EqualizeOptions.from_kwargs(**options)
    backend = get_backend(model)
    graph = backend.to_ir(model, **backend_options)
    result = equalize(graph, cle_options)
    return backend.apply(model, result, **backend_options), result.report
