"""The ONNX backend: Python API and the cle_core plugin."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from cle_core import Backend, EqualizeOptions, EqualizeResult, Graph, Report, equalize

from . import _io
from ._apply import apply, restore
from ._translate import Translation, to_ir

_META = "onnx_translation"


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


class OnnxBackend(Backend):
    """Translates ``onnx.ModelProto`` to the IR and writes results back.

    Options: ``inplace`` (write into the given proto instead of a copy).
    """

    name = "onnx"

    def to_ir(self, model: onnx.ModelProto, inplace: bool = False, **options: Any) -> Graph:
        _no_options(options)
        graph, tr = to_ir(model)
        graph.metadata[_META] = tr
        return graph

    def apply(
        self, model: onnx.ModelProto, result: EqualizeResult, inplace: bool = False, **options: Any
    ) -> onnx.ModelProto:
        _no_options(options)
        target = model if inplace else _copy(model)
        _inline(target, apply(target, result.graph.metadata[_META], result))
        return target


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"unexpected options for the ONNX backend: {', '.join(sorted(options))}")


def equalize_model(
    model_or_path: onnx.ModelProto | str | os.PathLike, *, inplace: bool = False, **options: Any
) -> tuple[onnx.ModelProto, Report]:
    """Equalize an ONNX model. Returns ``(equalized ModelProto, report)``.

    ``model_or_path`` is a ``ModelProto`` or the path of an ``.onnx`` file (whose
    external data, if any, is loaded into the returned proto; use :func:`equalize_file`
    to stream it instead). A given proto is not modified unless ``inplace=True``.
    Keyword options are :class:`cle_core.EqualizeOptions` fields (``max_sweeps``,
    ``high_bias`` ...).

    Raises :class:`cle_core.CLEError` subclasses on bad input; the model is then
    unchanged.
    """
    cle_options, rest = EqualizeOptions.from_kwargs(**options)
    _no_options(rest)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        model, base_dir, own = _io.load(path, external_data=True), str(path.parent), True
    else:
        model, base_dir, own = model_or_path, None, inplace
    result, tr = _equalize(model, cle_options, own, base_dir)
    target = model if (own or inplace) else _copy(model)
    _inline(target, apply(target, tr, result))
    return target, result.report


def _equalize(
    model, options: EqualizeOptions, own: bool, base_dir: str | None, progress=None
) -> tuple[EqualizeResult, Translation]:
    graph, tr = to_ir(model, take_ownership=own, base_dir=base_dir)
    try:
        return equalize(graph, options, progress), tr
    except BaseException:
        if own:
            restore(model, tr)
        raise


def equalize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    options: EqualizeOptions | None = None,
    progress=None,
) -> tuple[Report, list[Path]]:
    """Equalize the ONNX file ``src`` into ``dst``, atomically.

    Weights are held once in memory: external data is memory-mapped from ``src`` and
    streamed into ``<dst>.data``; changed tensors are written from the equalized arrays.
    Nothing is written when anything fails. ``progress(stage, fraction)`` is called as
    work proceeds. Returns the report and the files written.
    """
    src, dst = Path(src), Path(dst)
    model = _io.load(src)
    result, tr = _equalize(model, options or EqualizeOptions(), True, str(src.parent), progress)
    pending = apply(model, tr, result)
    files = _io.save(model, dst, source_dir=str(src.parent), pending=pending)
    return result.report, files
