"""What the command line asks of the ONNX backend beyond equalizing: random inputs
and the output comparison for ``--check``, inputs sized for the model, inspection and
quantized evaluation. The command line itself (``cle_core._cli``) knows no format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from cle_core import CLEError, OutputCheck, Probe
from cle_core._check import is_float
from cle_core._quality import load_inputs, sqnr_db

from . import _io
from ._calibrate import data_inputs, feeds
from ._probes import find_probes
from ._translate import np_dtype


def check_feeds(model, dims: dict[str, int], seed: int = 0) -> dict:
    """Random inputs for ``--check``, one per graph input of the ONNX ``model`` (standard
    normal, in the input's float type). Raises :class:`CLEError` for a dynamic
    dimension that ``dims`` does not size and for a non-float input."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in data_inputs(model):
        tensor = inp.type.tensor_type
        shape = []
        for d in tensor.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            elif d.dim_param:
                raise CLEError(
                    f"input {inp.name!r} has a dynamic dimension {d.dim_param!r}; give its "
                    f"size with --dim {d.dim_param}=SIZE"
                )
            else:
                raise CLEError(
                    f"input {inp.name!r} has an unnamed dynamic dimension; cannot --check it"
                )
        dtype = np_dtype(tensor.elem_type) or np.dtype(object)
        if dtype.kind != "f":
            raise CLEError(
                f"input {inp.name!r} has element type {dtype}; --check feeds floats only "
                "(run without --check, or check the model yourself)"
            )
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# Final activations that squash their input: near saturation they turn the logits' float
# rounding into large relative errors (sigmoid(-20) carries the logit's absolute error as
# a relative one), so a value made by one is also judged on the activation's input.
SATURATING = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "Tanh", "HardSigmoid"})
_PROBE_BYTES = 1 << 30  # larger models are judged on their outputs only


def _load_small(path: Path) -> onnx.ModelProto | None:
    """``path`` without its external data, or None when the model with its data is
    larger than :data:`_PROBE_BYTES` (running it twice more with extra outputs could
    exhaust memory)."""
    model = onnx.load(str(path), load_external_data=False)
    external = sum(
        int(e.value)
        for t in model.graph.initializer
        for e in t.external_data
        if e.key == "length" and e.value.isdigit()
    )
    return None if path.stat().st_size + external > _PROBE_BYTES else model


def _exposing(path: Path, model: onnx.ModelProto | None, values: list[str]):
    """What onnxruntime should run for ``path``: the file, or the serialized ``model``
    with those of ``values`` that it computes added to its outputs. Returns it and the
    values it will return besides the graph outputs."""
    from onnx import external_data_helper

    if model is None:
        return str(path), set()
    made = {o for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    add = [v for v in dict.fromkeys(values) if v in made and v not in outputs]
    if not add:
        return str(path), {v for v in values if v in outputs}
    model.graph.output.extend(onnx.ValueInfoProto(name=v) for v in add)
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model.SerializeToString(), {v for v in values if v in made | outputs}


def check_outputs(original: Path, equalized: Path, feeds: dict) -> list[OutputCheck]:
    """Run both files in onnxruntime on ``feeds``; one :class:`~cle_core.OutputCheck`
    per graph output of ``original``. An output behind a discontinuous operation (see
    :func:`~cle_onnx._probes.find_probes`) gets the values before it as probes; the
    output or probe made by a saturating activation (see :data:`SATURATING`) also gets
    the SQNR of that activation's input. Models above 1 GiB are compared at their
    outputs only."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise CLEError("--check needs onnxruntime: pip install 'crosslayer-eq[onnx]'") from None
    original, equalized = Path(original), Path(equalized)
    models = [_load_small(original), _load_small(equalized)]
    first = models[0] or onnx.load(str(original), load_external_data=False)
    names = [o.name for o in first.graph.output]
    probes = find_probes(models[0].graph) if None not in models else {}
    # Every value measured (a graph output judged on itself, or a probe) that a
    # saturating activation makes is also measured at the activation's input, found in
    # each model (the equalization may rename it).
    probed = [v for p in probes.values() for v, *_ in p]
    saturating = [_saturating(m, [n for n in names if n not in probes] + probed) for m in models]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    runs, available = [], None
    for path, model, sat in zip((original, equalized), models, saturating, strict=True):
        runnable, got_extra = _exposing(path, model, probed + [i for _, i in sat.values()])
        available = got_extra if available is None else available & got_extra
        sess = ort.InferenceSession(runnable, opts, providers=["CPUExecutionProvider"])
        got = [o.name for o in sess.get_outputs()]
        runs.append(dict(zip(got, sess.run(None, feeds), strict=True)))
    a, b = runs

    def before(value: str) -> tuple[str, float] | None:
        (op, ia), (_, ib) = saturating[0].get(value, ("", "")), saturating[1].get(value, ("", ""))
        if op and ia in a and ib in b:
            return op, _sqnr(a[ia], b[ib])
        return None

    results = []
    for name in names:
        ya, yb = np.asarray(a[name]), np.asarray(b[name])
        found = [
            Probe(v, op, node, _sqnr(a[v], b[v]), np.asarray(a[v]).dtype.name, before(v))
            for v, op, node in probes.get(name, [])
            if v in available
        ]
        # A probe the result lacks (a value renamed by the equalization) would leave part
        # of the output unjudged: the output is then judged on itself.
        if len(found) < len(probes.get(name, [])):
            found = []
        # Integer probes are exact in both models (every way from a float to an integer
        # is discontinuous, so the walk stops before it); only float ones say anything.
        found = [p for p in found if is_float(p.dtype)]
        results.append(
            OutputCheck(
                name,
                _sqnr(ya, yb),
                *_errors(ya, yb),
                dtype=ya.dtype.name,
                before=None if name in probes else before(name),
                probes=tuple(found),
                shapes=None if ya.shape == yb.shape else (ya.shape, yb.shape),
                differing=_differing(ya, yb),
            )
        )
    return results


def _saturating(model: onnx.ModelProto | None, values: list[str]) -> dict[str, tuple[str, str]]:
    """``{value: (op, its input)}`` for those of ``values`` that a saturating activation
    of ``model`` makes (none for a model judged on its outputs only)."""
    if model is None:
        return {}
    producer = {o: n for n in model.graph.node for o in n.output}
    return {
        v: (producer[v].op_type, producer[v].input[0])
        for v in values
        if v in producer and producer[v].op_type in SATURATING
    }


def _sqnr(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return sqnr_db(a, b) if a.shape == b.shape else -math.inf


def _differing(ya: np.ndarray, yb: np.ndarray) -> tuple[int, int] | None:
    """How many elements of an integer or bool output differ, of how many (None for a
    float output, or when the shapes differ)."""
    if is_float(ya.dtype.name) or ya.shape != yb.shape:
        return None
    return int(np.count_nonzero(ya != yb)), int(ya.size)


def _errors(ya: np.ndarray, yb: np.ndarray) -> tuple[float, float]:
    """Max absolute error and that over max ``|original|``."""
    if ya.shape != yb.shape:
        return math.inf, math.inf
    ya, yb = ya.astype(np.float64), yb.astype(np.float64)
    err = float(np.max(np.abs(ya - yb))) if ya.size else 0.0
    scale = float(np.max(np.abs(ya))) if ya.size else 0.0
    return err, err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def _first_dims(model: onnx.ModelProto) -> list:
    """The dimensions of the model's first data input (initializers listed as inputs,
    as before IR 4, are not inputs)."""
    graph_inputs = data_inputs(model)
    return list(graph_inputs[0].type.tensor_type.shape.dim) if graph_inputs else []


def input_size(model: onnx.ModelProto) -> tuple[int, int]:
    """The (height, width) of the model's first input, 224 x 224 where dynamic."""
    dims = _first_dims(model)
    hw = tuple(d.dim_value if d.dim_value > 0 else 224 for d in dims[2:4])
    return hw if len(hw) == 2 else (224, 224)


def fit_channels(images: np.ndarray, model: onnx.ModelProto) -> np.ndarray:
    """RGB ``images`` for the model's first input: averaged to grey for one channel."""
    dims = _first_dims(model)
    channels = dims[1].dim_value if len(dims) == 4 else 0
    if channels == 1 and images.ndim == 4 and images.shape[1] == 3:
        return images.mean(axis=1, keepdims=True).astype(images.dtype)
    return images


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def _type_name(elem: int) -> str:
    dtype = np_dtype(elem)
    if dtype is None or dtype.kind == "O":
        return TensorProto.DataType.Name(elem).lower()
    return dtype.name


def check_images_fit(model: onnx.ModelProto, images: str, hint: str) -> None:
    """Raise :class:`CLEError` (naming ``images`` and giving ``hint``) when the model's
    first input is not a float tensor: images cast to integers or booleans would run,
    and every figure measured on them would be meaningless."""
    graph_inputs = data_inputs(model)
    if not graph_inputs:
        return
    vi = graph_inputs[0]
    elem = vi.type.tensor_type.elem_type
    if elem not in _FLOATS:
        raise CLEError(
            f"{images}: model input {vi.name!r} takes {_type_name(elem)} values, which "
            f"images cannot stand for; {hint}"
        )


def _shape_text(dims) -> str:
    names = [str(d.dim_value) if d.dim_value > 0 else (d.dim_param or "?") for d in dims]
    return f"({', '.join(names)}{',' if len(names) == 1 else ''})"


def _known_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """The declared dimensions of ``vi`` (None where dynamic), or None if it declares
    no shape."""
    tensor = vi.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.dim_value > 0 else None for d in tensor.shape.dim]


def _conflict(a: list | None, b: list | None) -> bool:
    """Two declared shapes that cannot be the same, the batch axis 0 aside."""
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    return any(
        x is not None and y is not None and x != y for x, y in zip(a[1:], b[1:], strict=True)
    )


def check_same_io(a: onnx.ModelProto, b: onnx.ModelProto, name_a: str, name_b: str) -> None:
    """Raise :class:`CLEError` unless ``b`` takes the inputs of ``a`` (number, floats or
    not, fixed sizes) and declares a first output of the same shape: both run on one set
    of inputs (each in its own float type) and their outputs are compared element by
    element."""
    ins_a, ins_b = data_inputs(a), data_inputs(b)
    if len(ins_a) != len(ins_b):
        raise CLEError(
            f"{name_b} does not fit {name_a}: it takes {len(ins_b)} inputs, not {len(ins_a)}"
        )
    pairs = [(x, y, "input") for x, y in zip(ins_a, ins_b, strict=True)]
    for x, y, what in [*pairs, (a.graph.output[0], b.graph.output[0], "output")]:
        tx, ty = x.type.tensor_type, y.type.tensor_type
        floats = (tx.elem_type in _FLOATS, ty.elem_type in _FLOATS)
        if what == "input" and floats[0] != floats[1]:
            raise CLEError(
                f"{name_b} does not fit {name_a}: its input {y.name!r} takes "
                f"{_type_name(ty.elem_type)}, not {_type_name(tx.elem_type)}"
            )
        if _conflict(_known_dims(x), _known_dims(y)):
            raise CLEError(
                f"{name_b} does not fit {name_a}: its {what} {y.name!r} is "
                f"{_shape_text(ty.shape.dim)}, not {_shape_text(tx.shape.dim)}"
            )


def read_inputs(spec: Path, src: Path) -> np.ndarray:
    """A folder of images (resized to the input of the model in ``src``, grey for a
    one-channel input) or a .npy array; :class:`CLEError` naming ``spec`` for images
    given to a model whose input is not a float tensor, and for inputs that a
    single-input model cannot take (shape, type: see :func:`feeds`)."""
    model = _io.load(src)
    if Path(spec).is_dir():
        check_images_fit(model, str(spec), "give a .npy array of its values")
    inputs = fit_channels(load_inputs(spec, input_size(model)), model)
    if len(data_inputs(model)) == 1:  # else feeds() asks for a dict, which no file gives
        feeds(model, inputs, f"data in {spec}")
    return inputs


def evaluate_files(paths: list[Path], inputs, **quantization):
    """``cle evaluate``: the original (and the equalized) model quantized by onnxruntime's
    ``quantize_static`` (see :mod:`cle_onnx._evaluate`), figures against the original in
    FP32. The original is quantized with its batch norms
    folded (by this backend, as a deployment would fold them), so that folding is not
    counted as a loss or as a gain of equalization; the row says so."""
    from ._backend import equalize_model
    from ._evaluate import evaluable, evaluate_all

    loaded = [evaluable(_io.load(p, external_data=True)) for p in paths]
    folded, report = equalize_model(loaded[0], scale=False, high_bias=False)
    label, notes = "original", []
    if report.folds:
        label = "original*"
        notes.append(
            f"* with its {len(report.folds)} batch norms folded, as a deployment folds them "
            "(FP32 dB: against the unfolded original)"
        )
    try:
        # One run of the inputs and the FP32 reference serves every row.
        models = [folded, *loaded[1:]]
        names = [str(p) for p in (paths[0], *paths)]
        figures = evaluate_all(loaded[0], models, inputs, **quantization, names=names)
        rows = list(zip([label, "equalized"], figures, strict=False))
    except (ImportError, ValueError) as exc:  # a missing package; inputs that do not fit
        raise CLEError(str(exc)) from None
    out = loaded[0].graph.output[0].type.tensor_type
    return rows, out.HasField("shape") and len(out.shape.dim) == 2, notes
