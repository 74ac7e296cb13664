"""The backend protocol and the plugin host."""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import Distribution, EntryPoint, distributions
from pathlib import Path
from typing import Any, BinaryIO

import pluggy

from . import hookspecs
from ._check import OutputCheck
from ._deployment import Deployment
from ._equalize import equalize
from ._errors import CLEError, UnsupportedModelError
from ._files import check_output_path, write_atomic
from ._ir import Graph
from ._quality import load_array, load_arrays
from ._report import EqualizeOptions, EqualizeResult, Report
from ._verify import mean_db, quality_key

ENTRY_POINT_GROUP = "cle.backends"
"""Entry-point group where every backend, the built-in ones included, registers its
plugin module."""

logger = logging.getLogger("cle_core")


@dataclass
class Translated:
    """A model translated to the IR: the graph, and the backend's own translation state
    (any type it likes: where parameters came from, names, dtypes ...), which comes back
    to :meth:`Backend.apply` as ``state``. Nothing else carries backend state."""

    graph: Graph
    state: Any = None


def check_calibration(options: EqualizeOptions, calibration: Any) -> None:
    """Refuse options that measure on calibration inputs when none are given (before
    anything runs): the empirical bias correction."""
    if options.bias_correction_form == "empirical" and calibration is None:
        raise CLEError(
            "empirical bias correction measures on calibration inputs: give "
            "calibration= (--calibration)"
        )


class Backend(ABC):
    """Translates one model format to the IR and writes an equalization result back:
    the translation contract, all the Python API needs (:class:`FileBackend` adds what
    the command line needs).

    Backends hold no CLE math: :meth:`to_ir` copies parameters into a
    :class:`~cle_core.Graph` (arrays the core may replace), :meth:`apply` writes the
    changed and removed nodes of an :class:`~cle_core.EqualizeResult` back.
    """

    name: str = "backend"
    _reused: dict | None = None  # see statistics_reused

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

    @contextmanager
    def statistics_reused(self) -> Iterator[None]:
        """A block in which every :meth:`run` is on the same model with the same
        calibration inputs (the same object): their statistics are measured at the first
        run and reused by the others. ``verify`` with ``draws`` equalizes one model once
        per draw, and measuring the statistics is most of a calibrated run's time."""
        previous, self._reused = self._reused, {}
        try:
            yield
        finally:
            self._reused = previous

    def measured_statistics(self, calibration: Any, measure: Callable[[], dict]) -> dict:
        """``measure()``, or within :meth:`statistics_reused` what it gave for these
        calibration inputs."""
        if self._reused is None:
            return measure()
        key = id(calibration)
        if key not in self._reused:
            # the inputs are held with their statistics: their id is not reused meanwhile
            self._reused[key] = (calibration, measure())
        return self._reused[key][1]

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
        check_calibration(options, calibration)
        translated = self.to_ir(model, **backend_options)
        if not isinstance(translated, Translated):
            translated = Translated(translated)
            extra: dict[str, Any] = {}
        else:
            extra = {"state": translated.state}
        stats = None
        if calibration is not None:
            stats = self.measured_statistics(
                calibration, lambda: self.calibration_stats(translated, model, calibration)
            )
        result = equalize(translated.graph, options, progress, stats)
        new = self.apply(model, result, **extra, **backend_options)
        if options.bias_correction_form == "empirical":
            return self.correct_biases_empirically(new, calibration, result.report)
        return new, result.report

    def correct_biases_empirically(
        self, model: Any, calibration: Any, report: Report
    ) -> tuple[Any, Report]:
        """``bias_correction="empirical"``: ``model`` (equalized) with each layer's bias
        corrected from ``calibration`` data, layer by layer with the layers before
        already on the deployment's grid; and ``report`` with its
        ``bias_corrections``. A backend that runs models offers it."""
        raise UnsupportedModelError(
            f"the {self.name} backend has no empirical bias correction; "
            "bias_correction=True corrects from the input means (calibration= measures them)"
        )


class FileBackend(Backend):
    """A :class:`Backend` that the command line can use: the file and command services
    on top of the translation contract. A backend that answers the
    ``cle_backend_for_file`` hook is one; it implements :meth:`load` and :meth:`save`,
    and the rest have defaults built on them and on :meth:`Backend.run`, or say in one
    :class:`CLEError` that the backend does not offer them. Every default goes through
    :meth:`open_file`, so that a file reaches the IR the way the Python API's models do.
    """

    def load(self, path: Path) -> Any:
        """Read the model file ``path``; a :class:`CLEError` if it is missing or corrupt."""
        raise UnsupportedModelError(f"the {self.name} backend reads no model files")

    def save(self, model: Any, file: BinaryIO) -> None:
        """Write ``model`` into the open binary ``file`` (the caller makes it atomic)."""
        raise UnsupportedModelError(f"the {self.name} backend writes no model files")

    def open_file(self, path: Path) -> tuple[Any, dict[str, Any]]:
        """The model in ``path`` and the backend options :meth:`Backend.run` gets for it
        (by default :meth:`load` and none; the ONNX backend leaves external data on disk
        and says where it is)."""
        return self.load(Path(path)), {}

    def equalize_file(
        self,
        src: Path,
        dst: Path,
        options: EqualizeOptions,
        progress: Callable[[str, float], None] | None = None,
        calibration: Any = None,
        dims: dict[str, int] | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> tuple[Report, list[Path]]:
        """Equalize the file ``src`` into ``dst`` (which may be ``src``); returns the
        report and the files written. By default: :meth:`open_file`, check the output
        path, :meth:`Backend.run`, then write ``dst`` atomically with :meth:`save`.
        ``dims`` and ``shapes`` (``--dim``, ``--input-shape``; passed only where given)
        size the inputs' dynamic dimensions as in :meth:`read_inputs`: a backend may
        infer with them shapes the file leaves unknown (the default ignores them)."""
        model, backend_options = self.open_file(Path(src))
        check_output_path(dst)
        new, report = self.run(model, options, calibration, progress, **backend_options)
        return report, [write_atomic(dst, lambda f: self.save(new, f))]

    def inspect_file(
        self,
        src: Path,
        options: EqualizeOptions,
        dims: dict[str, int] | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> Report:
        """What equalizing ``src`` would do (nothing is written): :meth:`open_file`,
        :meth:`Backend.to_ir` and :func:`cle_core.equalize`, as :meth:`Backend.run`
        would, without the write-back. ``dims`` and ``shapes``: as in
        :meth:`equalize_file`."""
        model, backend_options = self.open_file(Path(src))
        translated = self.to_ir(model, **backend_options)
        graph = translated.graph if isinstance(translated, Translated) else translated
        return equalize(graph, options).report

    def read_inputs(
        self,
        spec: Path | None,
        src: Path,
        dims: dict[str, int] | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> Any:
        """Inputs for the model in ``src`` from ``spec`` (``--inputs``, ``--calibration``):
        by default a ``.npy`` array (a model with one input) or a ``.npz`` of arrays by
        input name (a dict). ``dims`` (``--dim``, sizes by dimension name) and ``shapes``
        (``--input-shape``, every size by input name) size what the backend makes
        itself, such as resized images. ``spec`` None: the backend's default inputs
        for ``cle evaluate``, or None (it has none, or makes them in
        :meth:`evaluate_files`)."""
        if spec is None:
            return None
        return load_arrays(spec) if Path(spec).suffix == ".npz" else load_array(spec)

    def check_feeds(
        self,
        src: Path,
        dims: dict[str, int],
        shapes: dict[str, tuple[int, ...]] | None = None,
        inputs: Any = None,
    ) -> Any:
        """The inputs on which ``cle equalize --check`` runs both files: ``inputs``
        (read by :meth:`read_inputs` from ``--inputs``), checked for the model, or else
        random ones, sized by ``dims`` and ``shapes`` as in :meth:`read_inputs`. One
        :class:`CLEError` names everything that is missing, each with its flag."""
        raise UnsupportedModelError(f"--check: the {self.name} backend cannot run its models")

    def compare(self, src: Path, dst: Path, feeds: Any) -> list[OutputCheck]:
        """One :class:`~cle_core.OutputCheck` per output of running both files on
        ``feeds``: the output's own figures, ``before`` for an output made by a
        saturating activation, and, for an output behind a discontinuous operation
        (top-k, arg-max, a gather by computed indices ...), the probes it is judged on
        instead: the float values before that operation, measured in both models."""
        raise UnsupportedModelError(f"--check: the {self.name} backend cannot run its models")

    def evaluate_files(self, paths: list[Path], inputs: Any, **quantization: Any):
        """``(rows, classifier, notes)`` for ``cle evaluate``: ``[(label, figures), ...]``
        with figures as :func:`cle_core.quality.quality_table` reads them, whether the
        model is a classifier (top-1 columns), and lines printed under the table."""
        raise UnsupportedModelError(f"the {self.name} backend has no quantized evaluation")

    def measure_files(
        self, paths: list[Path], pairs: list[tuple[Any, Any]], deployment: Deployment
    ) -> list[float]:
        """``--verify``: the deployment's figure (:func:`cle_core.toolkit.quality_key`)
        of each of ``paths`` against ``paths[0]`` in FP32, ``paths[0]`` (the original)
        with its batch norms folded: for each ``(calibrate_on, measure_on)`` of
        ``pairs`` (:func:`cle_core.toolkit.measure_pairs`) quantized with its grids
        calibrated on the one and measured on the other, the mean of those in dB. This
        default reads the figures from :meth:`evaluate_files` (two files at a time where
        it measures no more); a backend may measure the one figure alone, faster."""
        key = quality_key(deployment)

        def measured(calibrate_on: Any, measure_on: Any) -> list[float]:
            def rows(files: list[Path]) -> list:
                found, _, _ = self.evaluate_files(
                    files, measure_on, deployment=deployment, calibration=calibrate_on
                )
                return found

            figures = [row[key] for _, row in rows(paths)[: len(paths)]]
            for path in paths[len(figures) :]:
                figures.append(rows([paths[0], path])[1][1][key])
            return figures

        columns = zip(*(measured(*pair) for pair in pairs), strict=True)
        return [mean_db(column) for column in columns]


BUILTIN_DISTRIBUTION = "crosslayer-eq"
"""The distribution whose entry points are the built-in backends: their names are
reserved, and they are asked first."""


@dataclass(frozen=True)
class _Entry:
    """One entry point of the group, with the distribution that declares it."""

    ep: EntryPoint
    package: str
    version: str
    builtin: bool

    @property
    def name(self) -> str:
        return self.ep.name

    @property
    def label(self) -> str:
        return f"plugin {self.name!r} (package {self.package} {self.version})"


@dataclass
class _Host:
    """The loaded plugins: the manager, the claim order, and what was left out."""

    pm: pluggy.PluginManager
    order: list[str] = field(default_factory=list)  # registered names, in claim order
    labels: dict[str, str] = field(default_factory=dict)  # name -> "plugin 'x' (package y 1.0)"
    builtins: frozenset[str] = frozenset()  # entry-point names of the built-in backends
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not loaded


_host: _Host | None = None


def get_plugin_manager(reload: bool = False) -> pluggy.PluginManager:
    """The process-wide plugin manager, with every backend of the ``cle.backends``
    entry-point group loaded (the core names none).

    Each plugin is loaded on its own, so that a broken one costs only itself: one whose
    framework is not installed (``ModuleNotFoundError``) is skipped with a DEBUG message;
    one that raises anything else on import, whose entry points cannot be read, or whose
    hooks do not validate (a misspelled hook name, a wrong argument) is skipped with a
    one-line warning on the ``cle_core`` logger naming the plugin, its package and the
    error (with the traceback when that logger is at DEBUG). A third-party entry point
    named like a built-in backend (an entry point of the ``crosslayer-eq`` distribution)
    is skipped with a warning and never imported. Hooks are asked in claim order: the
    built-in backends first, then third-party ones by entry-point name.

    ``reload=True`` builds it anew (after installing a plugin at run time)."""
    return _load(reload).pm


def plugins() -> list[tuple[str, object]]:
    """The registered plugins as ``(entry-point name, plugin)``, in claim order: the
    built-in backends first, then third-party ones, each group sorted by entry-point
    name. Every hook the core calls asks them in this order, whatever their order on
    ``sys.path`` or their hook markers, and the first backend returned wins."""
    host = _load()
    return [(name, host.pm.get_plugin(name)) for name in host.order]


def builtin_names() -> frozenset[str]:
    """The entry-point names of the built-in backends, whether their framework is
    installed or not: no third-party plugin can take them."""
    return _load().builtins


def plugin_label(name: str) -> str:
    """``plugin 'name' (package dist version)``, for messages about a loaded plugin."""
    return _load().labels.get(name, f"plugin {name!r}")


def call_hook(hook: str, name: str, **kwargs: Any) -> list[Any]:
    """Call the implementations of ``hook`` of the one plugin ``name`` and return their
    results; whatever they raise propagates. Hook wrappers are not called: the core asks
    plugins one at a time, in claim order, so that one cannot stop another."""
    host = _load()
    results = []
    for impl in getattr(host.pm.hook, hook).get_hookimpls():
        if impl.plugin_name != name or impl.hookwrapper or impl.wrapper:
            continue
        # As pluggy calls it: an implementation may take a subset of the arguments.
        results.append(impl.function(*(kwargs[arg] for arg in impl.argnames)))
    return results


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, for warnings about a plugin."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def warn(message: str, exc: BaseException | None = None) -> None:
    """A one-line warning on the ``cle_core`` logger (``cle`` prints it on stderr as
    ``cle: warning: ...``); ``exc``'s traceback follows only when the logger is at DEBUG
    (``cle --debug``)."""
    show = exc is not None and logger.isEnabledFor(logging.DEBUG)
    logger.warning("%s", message, exc_info=exc if show else None)


def _load(reload: bool = False) -> _Host:
    global _host
    if _host is not None and not reload:
        return _host
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    entries = _entries()
    builtins = sorted((e for e in entries if e.builtin), key=lambda e: e.name)
    others = sorted(
        (e for e in entries if not e.builtin),
        key=lambda e: (e.name, _normalize(e.package), e.ep.value),
    )
    host = _Host(pm, builtins=frozenset(e.name for e in builtins))
    for entry in [*builtins, *others]:
        if not entry.builtin and entry.name in host.builtins:
            # Refused before import: installing a package never replaces a built-in backend.
            warn(
                f"{entry.label} skipped: {entry.name!r} is the name of a built-in backend "
                f"of {BUILTIN_DISTRIBUTION}"
            )
            continue
        if entry.name in host.labels:
            warn(f"{entry.label} skipped: the name is taken by {host.labels[entry.name]}")
            continue
        plugin = _import(entry, host)
        if plugin is not None:
            host.pm.register(plugin, name=entry.name)
            host.order.append(entry.name)
            host.labels[entry.name] = entry.label
            host.skipped.pop(entry.name, None)  # an earlier one of this name failed
    _host = host
    return host


def _import(entry: _Entry, host: _Host) -> object | None:
    """The plugin of ``entry``, imported and validated apart from the others; None (and
    the reason in ``host.skipped``) if it cannot be used."""
    try:
        plugin = entry.ep.load()
    except ModuleNotFoundError as exc:
        # The normal case of a backend whose framework is not installed (the core alone).
        logger.debug("backend %r skipped: %s is not installed", entry.name, exc.name)
        host.skipped[entry.name] = f"needs {exc.name or '?'}"
        return None
    except (Exception, SystemExit) as exc:  # a plugin that exits must not end ``cle``
        host.skipped[entry.name] = describe(exc)
        warn(f"{entry.label} skipped: {describe(exc)}", exc)
        return None
    problem = None
    if plugin is None:
        problem = f"{entry.ep.value} is None"
    elif host.pm.is_registered(plugin):
        problem = f"{entry.ep.value} is already plugin {host.pm.get_name(plugin)!r}"
    else:
        # Validated in a manager of its own: pluggy's check covers every plugin at once,
        # and a registration that fails half-way leaves hook callers behind.
        scratch = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        scratch.add_hookspecs(hookspecs)
        try:
            scratch.register(plugin, name=entry.name)
            scratch.check_pending()
        except Exception as exc:
            problem = describe(exc)
    if problem is not None:
        host.skipped[entry.name] = problem
        warn(f"{entry.label} skipped: {problem}")
        return None
    return plugin


def _entries() -> list[_Entry]:
    """The entry points of the group, each distribution read on its own:
    :func:`importlib.metadata.entry_points` fails as a whole on any one unreadable
    ``entry_points.txt``. The first of a distribution found twice on sys.path counts,
    as there."""
    entries: list[_Entry] = []
    seen: set[str] = set()
    for dist in distributions():
        try:
            # The name from the folder, as entry_points() does: reading every
            # distribution's metadata would cost each run of ``cle`` tens of ms.
            key = getattr(dist, "_normalized_name", None) or _normalize(dist.metadata["Name"])
            if key in seen:
                continue
            seen.add(key)
            eps = dist.entry_points.select(group=ENTRY_POINT_GROUP)
            if not eps:
                continue
            package, version = dist.metadata["Name"] or "?", dist.version or "?"
        except Exception as exc:
            text = _read_text(dist, "entry_points.txt")
            if f"[{ENTRY_POINT_GROUP}]" in text:  # else not ours to warn about
                warn(
                    f"package {_dist_name(dist)} skipped: its entry points cannot be read: "
                    f"{describe(exc)}",
                    exc,
                )
            continue
        builtin = _normalize(package) == _normalize(BUILTIN_DISTRIBUTION)
        entries.extend(_Entry(ep, package, version, builtin) for ep in eps)
    return entries


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _read_text(dist: Distribution, filename: str) -> str:
    try:
        return dist.read_text(filename) or ""
    except Exception:
        return ""


def _dist_name(dist: Distribution) -> str:
    try:
        return dist.metadata["Name"] or "?"
    except Exception:
        return str(getattr(dist, "_path", "?"))


def _ask(
    hook: str, about: str, kind: type[Backend] = Backend, **kwargs: Any
) -> tuple[Backend | None, list[str]]:
    """The first backend that a plugin, asked in claim order, returns for ``hook``; and
    the plugins that failed on the way. A :class:`CLEError` from a hook is its answer
    ("mine, but it cannot be read": the ONNX backend without onnx) and propagates; any
    other exception, or an answer that is not a ``kind``, is a bug of that plugin: it is
    skipped with a warning, and the next one is asked."""
    failed = []
    for name, _ in plugins():
        try:
            answers = call_hook(hook, name, **kwargs)
        except CLEError:
            raise
        except Exception as exc:
            warn(
                f"{plugin_label(name)} failed while asked about {about}: {describe(exc)}; skipped",
                exc,
            )
            failed.append(f"{name} ({describe(exc)})")
            continue
        for answer in answers:
            if answer is None:
                continue
            if isinstance(answer, kind):
                return answer, failed
            got = type(answer).__name__
            warn(
                f"{plugin_label(name)} returned {got}, not a cle_core.{kind.__name__}, for {about}"
            )
            failed.append(f"{name} (returned {got})")
    return None, failed


def get_backend(model: Any) -> Backend:
    """The backend that claims ``model``; :class:`UnsupportedModelError` if none does.
    Plugins are asked in claim order (:func:`plugins`)."""
    kind = type(model)
    what = f"{kind.__module__}.{kind.__qualname__}"
    backend, failed = _ask("cle_backend_for", f"a model of type {what}", model=model)
    if backend is None:
        raise UnsupportedModelError(
            f"no CLE backend handles a model of type {what} ({_registered(failed)})"
        )
    return backend


def _registered(failed: list[str]) -> str:
    """The registered backends, those left out and those that failed, for error messages."""
    host = _load()
    text = f"registered backends: {', '.join(host.order) or 'none'}"
    if host.skipped:
        text += "; not loaded: " + ", ".join(
            f"{name} ({why})" for name, why in sorted(host.skipped.items())
        )
    if failed:
        text += "; failed: " + ", ".join(failed)
    return text


def get_backend_for_file(path: str | Path) -> FileBackend:
    """The backend that reads the model file ``path`` (by suffix or content);
    :class:`UnsupportedModelError` if none does. Plugins are asked in claim order
    (:func:`plugins`)."""
    backend, failed = _ask("cle_backend_for_file", str(path), FileBackend, path=Path(path))
    if backend is None:
        # What the user can act on first: the suffixes that are read; then the plugins.
        read = sorted({s for _, plugin in plugins() for s in getattr(plugin, "suffixes", ())})
        raise UnsupportedModelError(
            f"{path}: no CLE backend reads this file (the registered backends read "
            f"{', '.join(read) or 'no files'}; {_registered(failed)})"
        )
    return backend


def equalize_model(model: Any, **options: Any) -> tuple[Any, Report]:
    """Equalize a model of any format a registered backend supports.

    Keyword arguments that are :class:`EqualizeOptions` fields configure CLE; the rest
    go to the backend. Returns ``(equalized model, report)``.
    """
    cle_options, backend_options = EqualizeOptions.from_kwargs(**options)
    return get_backend(model).run(model, cle_options, **backend_options)
