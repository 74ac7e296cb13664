"""The ONNX backend: Python API and the cle_core plugin."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from cle_core import (
    BiasCorrectionRecord,
    CLEError,
    EqualizeOptions,
    EqualizeResult,
    FileBackend,
    Report,
    Translated,
    equalize,
)
from cle_core.toolkit import (
    check_calibration,
    check_draws,
    check_output_path,
    folded_only,
    keep_best,
    mean_db,
    measure_pairs,
    measured_layout,
    quality_key,
)

from . import _check, _inputs, _io
from ._apply import apply
from ._calibrate import calibration_stats, data_inputs
from ._translate import Translation, to_ir


def _inline(model: onnx.ModelProto, pending: dict) -> None:
    """Store changed tensors of an externally stored model inside the proto (for the
    Python API, whose caller may save the model any way it likes)."""
    inits = {t.name: t for t in model.graph.initializer}
    for name, arr in pending.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _check_external(model: onnx.ModelProto, base_dir: str | os.PathLike | None) -> None:
    """A proto whose tensors still live in external files needs the folder they are
    relative to (the model file's, never the working directory)."""
    if not _io.has_external_data(model):
        return
    if base_dir is None:
        raise _io.ModelFileError(
            "the model's tensors are stored in external data files that were not loaded; "
            "pass base_dir= (the folder of the model file), pass the file's path instead of "
            "the proto, or load it with cle_onnx.load(path, external_data=True)"
        )
    _io.external_files(model, base_dir)


@dataclass
class _State:
    """The ONNX backend's translation state: the working proto whose weight bytes the
    graph took, and what the translation learned for writing back."""

    work: onnx.ModelProto
    tr: Translation


@dataclass
class Streamed:
    """What :meth:`OnnxBackend.apply` returns with ``stream=True``: the equalized proto,
    whose unchanged external tensors still live in the source's data files, and the
    arrays of the external tensors that changed, for :func:`equalize_file` to stream
    into the new data file (the weights are never held twice)."""

    model: onnx.ModelProto
    pending: dict


def _dir(base_dir: str | os.PathLike | None) -> str | None:
    return None if base_dir is None else str(base_dir)


def _channel_layouts(
    translated: Translated | None, model: onnx.ModelProto, input_shapes: dict | None = None
) -> dict:
    """Where the channels lie (:func:`cle_core.toolkit.measured_layout`) in the IR values
    whose channels are not on axis 1 alone (tokens ``(B, T, C)``, attention heads, the
    batch merged with the heads), for the statistics: from the translation given, or
    from a translation of ``model`` that only reads it."""
    if translated is not None:
        graph = translated.graph
    else:
        graph = to_ir(model, input_shapes=input_shapes)[0]
    graph.validate()  # where the channels are follows the ops
    return {
        name: measured_layout(v)
        for name, v in graph.values.items()
        if v.channel_outer is not None or v.channel_axes not in (None, (1,))
    }


class OnnxBackend(FileBackend):
    """Translates ``onnx.ModelProto`` to the IR and writes results back.

    Options: ``inplace`` (write into the given proto instead of a copy, once everything
    succeeded), ``base_dir`` (the folder external data is relative to), ``owned`` (the
    proto is handed over: translated without a copy), ``stream`` (return a
    :class:`Streamed` with external tensors left on disk, for writing a file).
    """

    name = "onnx"

    def to_ir(
        self,
        model: onnx.ModelProto,
        inplace: bool = False,
        base_dir: str | os.PathLike | None = None,
        owned: bool = False,
        stream: bool = False,
        input_shapes: dict | None = None,
        **options: Any,
    ) -> Translated:
        """Translate a working copy of ``model`` (``model`` itself with ``owned=True``: a
        proto the caller hands over), moving its weight bytes into the graph; the copy
        and the :class:`Translation` are the state :meth:`apply` writes into.
        ``input_shapes``: sizes of the inputs' dynamic dimensions (see :func:`to_ir`)."""
        _no_options(options)
        _check_external(model, base_dir)
        work = model if owned else _copy(model)
        graph, tr = to_ir(
            work, take_ownership=True, base_dir=_dir(base_dir), input_shapes=input_shapes
        )
        return Translated(graph, _State(work, tr))

    def apply(
        self,
        model: onnx.ModelProto,
        result: EqualizeResult,
        inplace: bool = False,
        base_dir: str | os.PathLike | None = None,
        owned: bool = False,
        stream: bool = False,
        state: _State | None = None,
        input_shapes: dict | None = None,  # the translation's (see to_ir)
        **options: Any,
    ) -> onnx.ModelProto | Streamed:
        _no_options(options)
        if state is None:
            raise ValueError("apply() needs the state to_ir() returned")
        pending = apply(state.work, state.tr, result)
        if stream:
            return Streamed(state.work, pending)
        _inline(state.work, pending)
        if not inplace or state.work is model:
            return state.work
        model.CopyFrom(state.work)  # every check passed: only now is the caller's proto touched
        return model

    def calibration_stats(
        self, translated: Translated, model, calibration, base_dir=None, input_shapes=None
    ):
        full = model
        if _io.has_external_data(model):
            full = _copy(model)
            onnx.external_data_helper.load_external_data_for_model(full, _dir(base_dir))
        layouts = _channel_layouts(translated, full, input_shapes)
        return calibration_stats(full, calibration, layouts)

    def run(self, model, options, calibration=None, progress=None, **backend_options):
        # Calibration runs the model as given: it must be read before the translation
        # moves the weight bytes out of an owned proto.
        stats = None
        if calibration is not None:
            stats = self.measured_statistics(
                calibration,
                lambda: self.calibration_stats(
                    None,
                    model,
                    calibration,
                    backend_options.get("base_dir"),
                    backend_options.get("input_shapes"),
                ),
            )
        check_calibration(options, calibration)
        empirical = options.bias_correction_form == "empirical"
        translated = self.to_ir(model, **backend_options)
        result = equalize(translated.graph, options, progress, stats)
        if not empirical:
            new = self.apply(model, result, state=translated.state, **backend_options)
            return new, result.report
        # The model runs once per layer: its weights are loaded whole, and a file is
        # written from the corrected proto instead of streamed. The caller's proto
        # (inplace) is written only once the correction has succeeded too.
        stream = backend_options.pop("stream", False)
        inplace = backend_options.pop("inplace", False)
        new = self.apply(model, result, state=translated.state, **backend_options)
        if _io.has_external_data(new):
            onnx.external_data_helper.load_external_data_for_model(
                new, _dir(backend_options.get("base_dir"))
            )
        new, report = self.correct_biases_empirically(new, calibration, result.report)
        if inplace and new is not model:
            model.CopyFrom(new)
            new = model
        return (Streamed(new, {}) if stream else new), report

    def correct_biases_empirically(self, model, calibration, report):
        from ._empirical import correct_empirically  # onnxruntime, only to run models

        corrected, shifts = correct_empirically(model, calibration, report.options.deployment)
        records = tuple(
            BiasCorrectionRecord(layer, shift, "calibration (empirical)", None, False)
            for layer, shift in shifts
        )
        return corrected, replace(report, bias_corrections=records)

    # --- files, for the command line -----------------------------------------------------

    def load(self, path: Path) -> onnx.ModelProto:
        return _io.load(path, external_data=True)

    def save(self, model: onnx.ModelProto, file) -> None:
        file.write(model.SerializeToString())

    def open_file(self, path: Path) -> tuple[onnx.ModelProto, dict]:
        # External data stays on disk: the translation memory-maps it from base_dir.
        return _io.load(path), {"base_dir": Path(path).parent, "owned": True}

    def inspect_file(self, src, options, dims=None, shapes=None):
        model, backend_options = self.open_file(Path(src))
        sizes = input_sizes(model, dims, shapes)
        translated = self.to_ir(model, input_shapes=sizes, **backend_options)
        return equalize(translated.graph, options).report

    def equalize_file(
        self, src, dst, options, progress=None, calibration=None, dims=None, shapes=None
    ):
        """See :func:`equalize_file`: :meth:`run` on the file's proto, external data
        streamed; ``dims`` and ``shapes`` size the inputs' dynamic dimensions for shape
        inference (see :func:`input_sizes`)."""
        src, dst = Path(src), Path(dst)
        model, backend_options = self.open_file(src)
        backend_options["input_shapes"] = input_sizes(model, dims, shapes)
        reads = _io.files_read(model, src)
        check_output_path(dst)
        same = os.path.realpath(dst) == os.path.realpath(src)
        if not same and Path(os.path.realpath(dst)) in reads:
            raise CLEError(
                f"{dst} is an external data file of {src}; writing it would destroy the input"
            )
        new, report = self.run(
            model, options, calibration, progress, stream=True, **backend_options
        )
        keep = set() if same else reads
        files = _io.save(new.model, dst, str(src.parent), new.pending, avoid=reads, keep=keep)
        return report, files

    def read_inputs(self, spec, src, dims=None, shapes=None):
        return _inputs.read_inputs(spec, src, dims, shapes)

    def check_feeds(self, src, dims, shapes=None, inputs=None):
        feeds = _inputs.check_feeds(_io.load(src), dims, shapes, inputs)
        # Inputs the graph refuses (a size it cannot take) are found before anything
        # is written, not after the equalized file is.
        _check.run_once(src, feeds)
        return feeds

    def compare(self, src, dst, feeds):
        return _check.check_outputs(src, dst, feeds)

    def evaluate_files(self, paths, inputs, **quantization):
        """``cle evaluate``: the original (and the equalized) model quantized by
        onnxruntime's ``quantize_static`` (see :mod:`cle_onnx._evaluate`), figures
        against the original in FP32. The original is quantized with its batch norms
        folded (by this backend, as a deployment would fold them), so that folding is
        not counted as a loss or as a gain of equalization; the row says so. Where
        activations are quantized, a note gives the SQNR with only the model's inputs
        rounded (:func:`cle_onnx._evaluate.input_grid_only`), which no scaling changes."""
        from . import _evaluate  # onnxruntime, loaded only to run models

        loaded = [_evaluate.evaluable(_io.load(p, external_data=True)) for p in paths]
        folded, report = self.run(loaded[0], EqualizeOptions(scale=False, high_bias=False))
        label, notes = "original", []
        if report.folds:
            label = "original*"
            notes.append(
                f"* with its {len(report.folds)} batch norms folded, as a deployment folds "
                "them (FP32 dB: against the unfolded original)"
            )
        try:
            # One run of the inputs and the FP32 reference serves every row; the input
            # grid's floor is the same at any equalization: taken with the original only.
            names = [str(p) for p in (paths[0], *paths)]
            if inputs is None:
                inputs = _evaluate.default_inputs(loaded[0])
            reference = _evaluate.run(loaded[0], inputs, name=names[0])
            figures = [
                *_evaluate.evaluate_all(
                    loaded[0],
                    [folded],
                    inputs,
                    reference=reference,
                    names=names[:2],
                    input_grid=True,
                    **quantization,
                ),
                *_evaluate.evaluate_all(
                    loaded[0],
                    loaded[1:],
                    inputs,
                    reference=reference,
                    names=[names[0], *names[2:]],
                    **quantization,
                ),
            ]
            labels = [label, "equalized", *(f"candidate {i}" for i in range(2, len(paths)))]
            rows = list(zip(labels[: len(paths)], figures, strict=True))
        except (ImportError, ValueError) as exc:  # a missing package; inputs that don't fit
            raise CLEError(str(exc)) from None
        floor = figures[0].get("input_grid_sqnr")
        if floor is not None:
            # What no equalization can lower: the rounding of the model's own inputs.
            notes.append(
                f"the input's own grid alone: {floor:.2f} dB (the inputs rounded as deployed, "
                "all else float; the same at any equalization)"
            )
        # Top-1 agreement means something for scores over several classes: (N, C), C > 1
        # (a detector's single probability column would always agree).
        dims = loaded[0].graph.output[0].type.tensor_type.shape.dim
        classifier = len(dims) == 2 and dims[1].dim_value != 1
        return rows, classifier, notes

    def measure_files(self, paths, pairs, deployment):
        """``--verify``'s figures (see :meth:`cle_core.FileBackend.measure_files`): the
        deployment's figure alone, the files read and the original folded once, one FP32
        run of the original per half serving every file."""
        from . import _evaluate  # onnxruntime, loaded only to run models

        loaded = [_evaluate.evaluable(_io.load(p, external_data=True)) for p in paths]
        folded, _ = self.run(loaded[0], EqualizeOptions(scale=False, high_bias=False))
        names = [str(paths[0]), *map(str, paths)]
        key = quality_key(deployment)
        try:
            halves = [
                [
                    f[key]
                    for f in _evaluate.evaluate_all(
                        loaded[0],
                        [folded, *loaded[1:]],
                        measure_on,
                        names=names,
                        deployment=deployment,
                        calibration=calibrate_on,
                        deployed_only=True,
                    )
                ]
                for calibrate_on, measure_on in pairs
            ]
        except (ImportError, ValueError) as exc:  # a missing package; inputs that don't fit
            raise CLEError(str(exc)) from None
        return [mean_db(column) for column in zip(*halves, strict=True)]


def input_sizes(model: onnx.ModelProto, dims=None, shapes=None) -> dict | None:
    """The sizes of each data input (None where not given) from ``dims`` (``--dim``, by
    dimension name) and ``shapes`` (``--input-shape``, by input name), for shape
    inference; None when neither is given. A name the model does not have, or a shape
    its input refuses, is one :class:`CLEError` naming each."""
    if not dims and not shapes:
        return None
    dims, shapes = dims or {}, shapes or {}
    problems = _inputs.unknown_names(model, dims, shapes)
    sizes = {}
    for vi in data_inputs(model):
        known, bad = _inputs.input_dims(vi, dims, shapes)
        problems += bad
        if known is not None:
            sizes[vi.name] = tuple(known)
    if problems:
        raise CLEError("; ".join(problems))
    return sizes


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"unexpected options for the ONNX backend: {', '.join(sorted(options))}")


def equalize_model(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    inplace: bool = False,
    base_dir: str | os.PathLike | None = None,
    calibration: Any = None,
    verify: bool = False,
    draws: int = 0,
    input_shapes: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, Report]:
    """Equalize an ONNX model. Returns ``(equalized ModelProto, report)``.

    ``model_or_path`` is a ``ModelProto`` or the path of an ``.onnx`` file (whose
    external data, if any, is loaded into the returned proto; use :func:`equalize_file`
    to stream it instead). A given proto is never modified, unless ``inplace=True``,
    and then only once everything has succeeded. A proto whose tensors are still in
    external files needs ``base_dir``, the folder of its model file. ``calibration``:
    optional inputs (an array ``(N, ...)``, or a dict of arrays by input name) on which
    the noise objective's statistics are measured in onnxruntime instead of estimated
    from the batch norms; a few dozen suffice. Each array must fit its input: floats for
    a float input (cast to its type), integers for an integer one, finite, of its rank
    and fixed sizes (the batch aside); paths and generators are refused (see
    ``docs/safety.rst``, "Calibration"). Keyword options are
    :class:`cle_core.EqualizeOptions` fields (``objective``, ``activation_bits``,
    ``per_channel``, ``deployment`` ...).

    ``input_shapes``: sizes by input name (``{"x": (1, 3, 48, 320)}``; None for a size
    left dynamic) for the dimensions the model leaves dynamic, the batch aside: shapes
    are inferred with them, so that Reshapes and the layers after them are known where
    the model computes its shapes from the input's (the file is not changed; the
    equalization holds for the model as it is, at any size its ops accept).

    ``verify=True`` (needs ``calibration``) quantizes the original, its batch norms
    folded, and the equalized model with the deployment the scales were chosen for
    (onnxruntime's ``quantize_static``; each half of the inputs calibrating while the
    other is measured, the mean of the two figures) and returns the better of the two;
    ``report.verification`` has both figures (a warning says when the original was
    kept). ``draws=N`` with ``verify`` also measures ``N`` redrawn equalizations
    (``scale_draw`` 1 to ``N``: each channel's scale times ``exp(0.02 z)``, all exact)
    and keeps the best measured of all: one quantized figure is one draw of the
    rounding, and the draws spread by several dB (``docs/core.rst``, "Verify"). It
    costs ``N`` more equalizations and twice as many quantizations (one per half); at
    most three models are held besides yours.

    Raises :class:`cle_core.CLEError` subclasses on bad input (:class:`ModelFileError`
    for files and external data); the model is then unchanged.
    """
    cle_options, rest = EqualizeOptions.from_kwargs(**options)
    _no_options(rest)
    draws = check_draws(draws, verify, cle_options)
    if verify and calibration is None:
        raise CLEError("verify needs calibration inputs (calibration=) to measure on")
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        model = _io.load(path, external_data=True)  # ours: translated without a copy
        base_dir, inplace, owned = path.parent, False, not verify
    else:
        model, owned = model_or_path, False
    sizes = {"input_shapes": dict(input_shapes)} if input_shapes else {}
    if not verify:
        return OnnxBackend().run(
            model,
            cle_options,
            calibration,
            inplace=inplace,
            base_dir=base_dir,
            owned=owned,
            **sizes,
        )

    backend = OnnxBackend()

    def equalized(k: int):
        drawn = replace(cle_options, scale_draw=k)
        return backend.run(model, drawn, calibration, base_dir=base_dir, **sizes)

    folded, _ = backend.run(model, folded_only(cle_options), base_dir=base_dir, **sizes)
    with backend.statistics_reused():  # one model, one set of inputs, a run per draw
        return _verified(model, folded, equalized, draws, cle_options, calibration, inplace)


def _verified(model, folded, equalized, draws: int, options, calibration, inplace: bool):
    """The best of ``folded`` and ``equalized(k)`` for ``k`` in ``0 .. draws`` in the
    options' deployment (see :func:`equalize_model`), with the report's verification.
    One candidate is held at a time besides the best so far."""
    from ._evaluate import evaluate_all, run  # onnxruntime, loaded only to run models

    deployment = options.deployment
    pairs, count = measure_pairs(calibration, deployment)
    key = quality_key(deployment)
    # one FP32 run per half measured serves every model
    references = [run(model, measure_on, name="the model") for _, measure_on in pairs]

    def measure(candidate, name: str = "the equalized model") -> float:
        figures = [
            evaluate_all(
                model,
                [candidate],
                measure_on,
                reference=reference,
                names=["the model", name],
                deployment=deployment,
                calibration=calibrate_on,
                deployed_only=True,
            )[0][key]
            for (calibrate_on, measure_on), reference in zip(pairs, references, strict=True)
        ]
        return mean_db(figures)

    original_db = measure(folded, "the original (batch norms folded)")
    chosen, report = keep_best(folded, original_db, equalized, measure, draws, deployment, count)
    if inplace:
        model.CopyFrom(chosen)
        chosen = model
    return chosen, report


def equalize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    options: EqualizeOptions | None = None,
    progress=None,
    calibration: Any = None,
) -> tuple[Report, list[Path]]:
    """Equalize the ONNX file ``src`` into ``dst`` (``dst`` may be ``src``: in place).

    Weights are held once in memory: external data is memory-mapped from ``src`` and
    streamed into a data file beside ``dst``; changed tensors are written from the
    equalized arrays. Everything is checked before the first byte is written; the
    write is crash-safe (see ``docs/safety.rst``): a kill at any moment leaves the old
    ``dst`` or the new one, both loadable, and never touches a file ``src`` reads
    (unless ``dst`` is ``src``). ``progress(stage, fraction)`` is called as work
    proceeds. ``calibration``: as in :func:`equalize_model` (the model is then also
    loaded whole, once, to run it). Returns the report and the files written.

    Raises:
        ModelFileError: ``src`` or its external data is missing, corrupt or unsafe.
        OutputPathError: ``dst`` is a folder, or its folder is missing or read-only.
        CLEError: ``dst`` would overwrite a data file that ``src`` reads; any other
            bad input.
    """
    options = options or EqualizeOptions()
    return OnnxBackend().equalize_file(src, dst, options, progress, calibration)
