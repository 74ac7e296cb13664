"""The backend protocol and the plugin host."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, BinaryIO

import pluggy

from . import hookspecs
from ._equalize import equalize
from ._errors import UnsupportedModelError
from ._files import check_output_path, write_atomic
from ._ir import Graph
from ._report import EqualizeOptions, EqualizeResult, Report

ENTRY_POINT_GROUP = "cle.backends"
"""Entry-point group where every backend, the built-in ones included, registers its
plugin module."""

logger = logging.getLogger("cle_core")

_plugin_manager: pluggy.PluginManager | None = None
_skipped: dict[str, str] = {}  # entry-point name -> the module it could not import


@dataclass
class Translated:
    """A model translated to the IR: the graph, and the backend's own translation state
    (any type it likes: where parameters came from, names, dtypes ...), which comes back
    to :meth:`Backend.apply` as ``state``. Nothing else carries backend state."""

    graph: Graph
    state: Any = None


class Backend(ABC):
    """Translates one model format to the IR and writes an equalization result back.

    Backends hold no CLE math: :meth:`to_ir` copies parameters into a
    :class:`~cle_core.Graph` (arrays the core may replace), :meth:`apply` writes the
    changed and removed nodes of an :class:`~cle_core.EqualizeResult` back.
    """

    name: str = "backend"

    @abstractmethod
    def to_ir(self, model: Any, **options: Any) -> Graph | Translated:
        """Translate ``model`` into a graph. Never modifies ``model``. Return a
        :class:`Translated` to get state back in :meth:`apply`."""

    @abstractmethod
    def apply(self, model: Any, result: EqualizeResult, **options: Any) -> Any:
        """Return the equalized model (``model`` itself when written in place). Gets
        ``state=`` (the :class:`Translated` state) when :meth:`to_ir` returned one."""

    def calibration_stats(self, translated: Translated, model: Any, calibration: Any) -> dict:
        """Per-channel statistics of the IR values, measured by running ``model`` on
        ``calibration`` (see :class:`cle_core._stats.ChannelStats`)."""
        raise UnsupportedModelError(f"the {self.name} backend takes no calibration data")

    def run(
        self,
        model: Any,
        options: EqualizeOptions,
        calibration: Any = None,
        progress: Callable[[str, float], None] | None = None,
        **backend_options: Any,
    ) -> tuple[Any, Report]:
        """The one path from a model to its equalized copy: :meth:`to_ir`, optional
        calibration, :func:`cle_core.equalize`, :meth:`apply`. Every public
        ``equalize_model`` goes through it."""
        translated = self.to_ir(model, **backend_options)
        if not isinstance(translated, Translated):
            translated = Translated(translated)
            extra: dict[str, Any] = {}
        else:
            extra = {"state": translated.state}
        stats = None
        if calibration is not None:
            stats = self.calibration_stats(translated, model, calibration)
        result = equalize(translated.graph, options, progress, stats)
        return self.apply(model, result, **extra, **backend_options), result.report

    # --- model files, for the command line (all optional) ------------------------------
    # A backend that reads files answers the ``cle_backend_for_file`` hook and implements
    # ``load`` and ``save``; the rest have defaults built on them, or say in one
    # :class:`CLEError` that the backend does not offer them.

    def load(self, path: Path) -> Any:
        """Read the model file ``path``; a :class:`CLEError` if it is missing or corrupt."""
        raise UnsupportedModelError(f"the {self.name} backend reads no model files")

    def save(self, model: Any, file: BinaryIO) -> None:
        """Write ``model`` into the open binary ``file`` (the caller makes it atomic)."""
        raise UnsupportedModelError(f"the {self.name} backend writes no model files")

    def equalize_file(
        self,
        src: Path,
        dst: Path,
        options: EqualizeOptions,
        progress: Callable[[str, float], None] | None = None,
        calibration: Any = None,
    ) -> tuple[Report, list[Path]]:
        """Equalize the file ``src`` into ``dst`` (which may be ``src``); returns the
        report and the files written. By default: load, check the output path,
        equalize, apply, then write ``dst`` atomically."""
        model = self.load(Path(src))
        check_output_path(dst)
        new, report = self.run(model, options, calibration, progress)
        return report, [write_atomic(dst, lambda f: self.save(new, f))]

    def inspect_file(self, src: Path, options: EqualizeOptions) -> Report:
        """What equalizing ``src`` would do (nothing is written)."""
        translated = self.to_ir(self.load(Path(src)))
        graph = translated.graph if isinstance(translated, Translated) else translated
        return equalize(graph, options).report

    def read_inputs(self, spec: Path, src: Path) -> Any:
        """Inputs for the model in ``src`` from ``spec`` (``--calibration``, ``--inputs``):
        by default a ``.npy`` array."""
        from ._quality import load_array

        return load_array(spec)

    def check_feeds(self, src: Path, dims: dict[str, int]) -> Any:
        """Random inputs on which ``cle equalize --check`` runs both files (``dims``
        sizes dynamic dimensions by name)."""
        raise UnsupportedModelError(f"--check: the {self.name} backend cannot run its models")

    def compare(self, src: Path, dst: Path, feeds: Any) -> list[tuple]:
        """One ``(output, SQNR dB, max abs error, relative error, dtype name, before)``
        per output of running both files on ``feeds``; ``before`` is ``(op, SQNR dB)``
        of the input of a saturating final activation, or None."""
        raise UnsupportedModelError(f"--check: the {self.name} backend cannot run its models")

    def evaluate_files(self, paths: list[Path], inputs: Any, **quantization: Any):
        """``(rows, classifier, notes)`` for ``cle evaluate``: ``[(label, figures), ...]``
        with figures as :func:`cle_core.quality.quality_table` reads them, whether the
        model is a classifier (top-1 columns), and lines printed under the table."""
        raise UnsupportedModelError(f"the {self.name} backend has no quantized evaluation")


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
        _skipped.clear()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None:
                continue  # the same distribution found twice on sys.path
            try:
                plugin = ep.load()
            except ModuleNotFoundError as exc:
                logger.debug("backend %r skipped: %s is not installed", ep.name, exc.name)
                _skipped[ep.name] = exc.name or "?"
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
            f"(registered backends: {names}{_missing()})"
        )
    return backend


def _missing() -> str:
    """The backends left out for a missing framework, for error messages."""
    if not _skipped:
        return ""
    parts = ", ".join(f"{name} (needs {module})" for name, module in sorted(_skipped.items()))
    return f"; not loaded: {parts}"


def get_backend_for_file(path: str | Path) -> Backend:
    """The backend that reads the model file ``path`` (by suffix or content);
    :class:`UnsupportedModelError` if none does."""
    pm = get_plugin_manager()
    backend = pm.hook.cle_backend_for_file(path=Path(path))
    if backend is None:
        names = ", ".join(name for name, _ in pm.list_name_plugin()) or "none"
        raise UnsupportedModelError(
            f"{path}: no CLE backend reads this file (registered backends: {names}{_missing()})"
        )
    return backend


def equalize_model(model: Any, **options: Any) -> tuple[Any, Report]:
    """Equalize a model of any format a registered backend supports.

    Keyword arguments that are :class:`EqualizeOptions` fields configure CLE; the rest
    go to the backend. Returns ``(equalized model, report)``.
    """
    cle_options, backend_options = EqualizeOptions.from_kwargs(**options)
    return get_backend(model).run(model, cle_options, **backend_options)
