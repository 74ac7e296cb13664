"""Calibration statistics for the ONNX backend: run the model in onnxruntime on a few
inputs with every IR value exposed as an output, and measure per channel what the
noise objective would otherwise estimate (see cle_core._stats)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from cle_core import CLEError
from cle_core.toolkit import (
    ChannelStats,
    StatsAccumulator,
    check_finite,
    check_real_dtype,
    describe_arrays,
    is_float_dtype,
)

from ._translate import np_dtype

BATCH = 4  # every intermediate tensor of a batch is held at once


def calibration_stats(
    model: onnx.ModelProto,
    inputs: Any,
    layouts: Mapping[str, dict] | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of every float tensor that a node of ``model`` (with its
    weights loaded) computes, measured on ``inputs``: an array ``(N, ...)`` for a model
    with one input, or a dict of arrays by input name. ``layouts``: where the channels
    of a tensor are when not on axis 1 alone (``cle_core._stats.measured_layout`` of
    its IR value)."""
    layouts = layouts or {}
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise CLEError("calibration needs onnxruntime: pip install 'crosslayer-eq[onnx]'") from None
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = list(
        dict.fromkeys(o for n in probe.graph.node for o in n.output if o and o not in known)
    )
    for name in wanted:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds_ = feeds(model, inputs, "calibration")
    opts = ort.SessionOptions()
    # 4 (fatal only): a run that fails raises, and says it once, in our one line
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(
            probe.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise CLEError(
            f"onnxruntime cannot run the model for calibration: {_first_line(exc)}"
        ) from None
    names = [o.name for o in sess.get_outputs()]
    acc = StatsAccumulator()
    axes = batch_axes(model)
    n = examples(feeds_, axes)
    fixed = fixed_batch(model)
    if fixed and n < fixed:
        raise CLEError(f"the model takes batches of {fixed}; calibration holds only {n} inputs")
    size = fixed or BATCH
    # A fixed batch size drops the incomplete last batch; any other takes it as it is.
    for start in range(0, n - n % fixed if fixed else n, size):
        batch = take(feeds_, axes, start, start + size)
        try:
            outs = sess.run(None, batch)
        except Exception as exc:
            raise CLEError(
                f"the model does not run on the calibration inputs "
                f"({describe_arrays(batch)}): {_first_line(exc)}"
            ) from None
        for name, out in zip(names, outs, strict=True):
            acc.add(name, out, **layouts.get(name, {}))
    return acc.result()


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The axis along which each data input holds its examples: 0; or, for an input
    whose first size is fixed while another input's is dynamic (a recurrent state
    ``(2, batch, 128)``), the axis named as the batch dimension, else its one dynamic
    axis; None for a scalar input (a sample rate, a flag) and for an input with no
    dynamic axis there, which every batch gets whole."""
    shapes = {}
    for vi in data_inputs(model):
        tensor = vi.type.tensor_type
        shapes[vi.name] = list(tensor.shape.dim) if tensor.HasField("shape") else None
    batch = next((d[0].dim_param for d in shapes.values() if d and d[0].dim_param), "")
    batched = any(d and not _fixed(d[0]) for d in shapes.values())
    axes: dict[str, int | None] = {}
    for name, dims in shapes.items():
        if dims is not None and not dims:
            axes[name] = None
        elif not (batched and dims and _fixed(dims[0])):
            axes[name] = 0
        else:
            named = [i for i, d in enumerate(dims) if batch and d.dim_param == batch]
            dynamic = [i for i, d in enumerate(dims) if not _fixed(d)]
            if named or len(dynamic) == 1:
                axes[name] = (named or dynamic)[0]
            else:
                axes[name] = None if not dynamic else 0
    return axes


def _fixed(d) -> bool:
    return d.HasField("dim_value") and d.dim_value > 0


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model requires, if its first batched input fixes one."""
    axes = batch_axes(model)
    for vi in data_inputs(model):
        axis = axes[vi.name]
        dims = vi.type.tensor_type.shape.dim
        if axis is not None and len(dims) > axis:
            d = dims[axis]
            return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
    return None


def examples(fed: dict[str, np.ndarray], axes: dict[str, int | None]) -> int:
    """The number of examples in ``fed`` (1 if every input is a scalar)."""
    sizes = [v.shape[axes[k]] for k, v in fed.items() if axes.get(k) is not None]
    return sizes[0] if sizes else 1


def take(
    fed: dict[str, np.ndarray], axes: dict[str, int | None], start: int, stop: int
) -> dict[str, np.ndarray]:
    """Examples ``start:stop`` of every input, each along its batch axis; scalar inputs
    whole."""
    out = {}
    for k, v in fed.items():
        axis = axes.get(k)
        out[k] = v if axis is None else v[(slice(None),) * axis + (slice(start, stop),)]
    return out


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that take data: every input but the initializers (which IR < 4
    lists as inputs too)."""
    constant = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constant]


def feeds(
    model: onnx.ModelProto, inputs: Any, what: str = "inputs", whole: bool = False
) -> dict[str, np.ndarray]:
    """``inputs`` (an array for a model with one input, or a dict of arrays by input
    name) as onnxruntime feeds in each input's element type. ``what`` names them in the
    errors, each a :class:`CLEError`: a path, a generator or a ragged list instead of
    an array; a missing or unknown input; strings, records, objects or complex numbers;
    integers or bools for a float input, floats for an integer one, values that do not
    fit the input's type; NaN or Inf (:class:`NonFiniteError`, with the first index); a
    shape that the input's declared shape refuses (the batch axis aside, see
    :func:`batch_axes`); arrays of different numbers of examples. ``whole``: the
    arrays are one run's inputs, never split into batches; their batch axis is checked
    too and may differ in length."""
    graph_inputs = data_inputs(model)
    _not_a_path(inputs, what)
    if isinstance(inputs, Mapping):
        given = dict(inputs)
    else:
        if len(graph_inputs) != 1:
            raise CLEError(
                f"the model has {len(graph_inputs)} inputs "
                f"({', '.join(i.name for i in graph_inputs)}); give the {what} as a dict of "
                "arrays by input name (an .npz file on the command line)"
            )
        given = {graph_inputs[0].name: inputs}
    axes = batch_axes(model)
    out = {}
    for vi in graph_inputs:
        if vi.name not in given:
            name = repr(vi.name)
            raise CLEError(
                f"no data for model input {name}: the {what} has no values for input {name}"
            )
        axis = None if whole else axes[vi.name]
        out[vi.name] = _feed(vi, given[vi.name], f"the {what} for model input {vi.name!r}", axis)
    unknown = set(given) - set(out)
    if unknown:
        raise CLEError(f"the model has no input(s) named {sorted(unknown)} (in the {what})")
    if not whole:
        sizes = {v.shape[axes[k]] for k, v in out.items() if axes[k] is not None}
        if len(sizes) > 1 or 0 in sizes:
            raise CLEError(
                f"every array of the {what} needs the same number (> 0) of examples "
                f"({describe_arrays(out)})"
            )
    return out


def _not_a_path(value: Any, what: str) -> None:
    if isinstance(value, (str, bytes, os.PathLike)):
        raise CLEError(
            f"the {what} is a path ({os.fsdecode(value)!r}); the Python API takes arrays: "
            "load them first (numpy.load, or cle_core.quality.images_from_folder for a "
            "folder of images)"
        )


def _feed(vi: onnx.ValueInfoProto, value: Any, what: str, axis: int | None = 0) -> np.ndarray:
    """One input's array, checked against the graph input ``vi`` (its size along the
    batch ``axis`` aside) and cast to its type."""
    _not_a_path(value, what)
    if isinstance(value, Iterator):
        raise CLEError(
            f"{what} is a {type(value).__name__}; expected an array (N, ...) "
            "(numpy.concatenate(list(batches)) joins batches)"
        )
    try:
        given = np.asarray(value)
    except Exception as exc:  # nested lists of different lengths; whatever __array__ raises
        raise CLEError(
            f"{what} is not a rectangular array of numbers ({_first_line(exc)})"
        ) from None
    check_real_dtype(given.dtype, what)
    tensor = vi.type.tensor_type
    dtype = np_dtype(tensor.elem_type) or np.dtype(np.float32)
    _check_kind(given.dtype, dtype, what)
    _check_shape(given.shape, tensor, what, axis)
    check_finite(given, what)
    if dtype.kind in "iu" and given.dtype != dtype and given.size:
        lo, hi = given.min(), given.max()
        info = np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise CLEError(f"{what}: the value {bad} does not fit {dtype}")
    try:
        with np.errstate(over="ignore"):  # an overflow is refused below, with its index
            # Not ascontiguousarray: it makes a scalar (a sample rate) an array of one.
            fed = np.asarray(given, dtype=dtype, order="C")
    except MemoryError:
        raise CLEError(
            f"{what}: {given.shape} {dtype} does not fit in memory; a few dozen examples are enough"
        ) from None
    if is_float_dtype(dtype) and fed.dtype.itemsize < given.dtype.itemsize:
        check_finite(fed, what, overflow_of=given)
    return fed


def _check_kind(given: np.dtype, dtype: np.dtype, what: str) -> None:
    """Floats feed a float input, integers an integer one, bools a bool one. Casting
    across kinds has no meaning the data could carry: uint8 images cast to float are not
    the normalized images a float model was trained on, and floats cast to an integer
    input are truncated."""
    kind = "f" if is_float_dtype(dtype) else dtype.kind
    if kind not in "biuf":
        raise CLEError(f"{what}: the input takes {dtype} values, which cannot be fed")
    has = "f" if is_float_dtype(given) else given.kind
    if has == kind or {has, kind} <= set("iu"):
        return
    if kind == "f":
        hint = ": convert them to floats and normalize them as the model expects"
    elif kind in "iu":
        hint = ": give integers (such as token ids), not images or other floats"
    else:
        hint = ""
    raise CLEError(f"{what} holds {given} values, but the input takes {dtype}{hint}")


def _check_shape(shape: tuple, tensor, what: str, axis: int | None = 0) -> None:
    """The declared rank, and every declared size but the batch ``axis`` (a model with
    a fixed batch size is run in batches of it)."""
    if not tensor.HasField("shape"):
        return
    dims = tensor.shape.dim
    declared = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in dims
    ]
    if axis is not None and axis < len(declared):
        declared[axis] = "N"  # not checked
    text = "(" + ", ".join(str(d) for d in declared) + ("," if len(declared) == 1 else "") + ")"
    if len(shape) != len(dims) or any(
        isinstance(d, int) and d != n for d, n in zip(declared, shape, strict=True)
    ):
        raise CLEError(f"{what} has shape {tuple(shape)}, but the input takes {text}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
