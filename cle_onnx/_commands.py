"""What the command line asks of the ONNX backend beyond equalizing: random inputs
and the output comparison for ``--check``, inputs sized for the model, inspection and
quantized evaluation. The command line itself (``cle_core._cli``) knows no format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx

from cle_core import CLEError, EqualizeOptions, Report, equalize
from cle_core._quality import load_inputs, sqnr_db

from . import _io
from ._calibrate import data_inputs
from ._translate import np_dtype, to_ir


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
# a relative one), so an output behind one is also judged on the activation's input.
SATURATING = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "Tanh", "HardSigmoid"})
_PROBE_BYTES = 1 << 30  # larger models are judged on their outputs only


def _probe(path: Path):
    """What onnxruntime should run for ``path`` (the file, or the serialized model with
    the input of every saturating op that makes a graph output exposed too), the graph
    output names, and ``{output: (op, exposed name)}``."""
    from onnx import external_data_helper

    model = onnx.load(str(path), load_external_data=False)
    external = sum(
        int(e.value)
        for t in model.graph.initializer
        for e in t.external_data
        if e.key == "length" and e.value.isdigit()
    )
    names = [o.name for o in model.graph.output]
    if path.stat().st_size + external > _PROBE_BYTES:
        return str(path), names, {}
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    pre = {}
    for out in list(model.graph.output):
        node = producer.get(out.name)
        if node is not None and node.op_type in SATURATING and node.input[0] not in outputs:
            pre[out.name] = (node.op_type, node.input[0])
            outputs.add(node.input[0])
            model.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
    if not pre:
        return str(path), names, {}
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model.SerializeToString(), names, pre


def check_outputs(original: Path, equalized: Path, feeds: dict):
    """Run both files in onnxruntime on ``feeds``. Returns one ``(output name, SQNR dB,
    max abs error, max error / max |original|, dtype name, before)`` per output: the
    SQNR of the equalized output against the original's; ``before`` is ``(op, SQNR dB)``
    of the input of a saturating final activation (see :data:`SATURATING`), or None."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise CLEError("--check needs onnxruntime: pip install 'crosslayer-eq[onnx]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    runs = []
    for path in (Path(original), Path(equalized)):
        model, names, pre = _probe(path)
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        got = [o.name for o in sess.get_outputs()]
        runs.append((names, dict(zip(got, sess.run(None, feeds), strict=True)), pre))
    (names, a, pre_a), (_, b, pre_b) = runs
    results = []
    for name in names:
        ya, yb = a[name], b[name]
        dtype = np.asarray(ya).dtype
        ya = np.asarray(ya, np.float64)
        yb = np.asarray(yb, np.float64)
        err = float(np.max(np.abs(ya - yb))) if ya.size else 0.0
        scale = float(np.max(np.abs(ya))) if ya.size else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        before = None
        if name in pre_a and name in pre_b:
            op = pre_a[name][0]
            before = (op, sqnr_db(np.asarray(a[pre_a[name][1]]), np.asarray(b[pre_b[name][1]])))
        results.append((name, sqnr_db(ya, yb), err, rel, dtype.name, before))
    return results


def input_size(model: onnx.ModelProto) -> tuple[int, int]:
    """The (height, width) of the model's first input, 224 x 224 where dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    hw = tuple(d.dim_value if d.dim_value > 0 else 224 for d in dims[2:4])
    return hw if len(hw) == 2 else (224, 224)


def fit_channels(images: np.ndarray, model: onnx.ModelProto) -> np.ndarray:
    """RGB ``images`` for the model's first input: averaged to grey for one channel."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    channels = dims[1].dim_value if len(dims) == 4 else 0
    if channels == 1 and images.ndim == 4 and images.shape[1] == 3:
        return images.mean(axis=1, keepdims=True).astype(images.dtype)
    return images


def read_inputs(spec: Path, src: Path) -> np.ndarray:
    """A folder of images (resized to the input of the model in ``src``, grey for a
    one-channel input) or a .npy array."""
    model = _io.load(src)
    return fit_channels(load_inputs(spec, input_size(model)), model)


def inspect_file(src: Path, options: EqualizeOptions) -> Report:
    """What equalizing ``src`` would do; its external data is read, never loaded whole."""
    graph, _ = to_ir(_io.load(src), base_dir=str(Path(src).parent))
    return equalize(graph, options).report


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
        figures = evaluate_all(loaded[0], models, inputs, **quantization)
        rows = list(zip([label, "equalized"], figures, strict=False))
    except (ImportError, ValueError) as exc:  # a missing package; inputs that do not fit
        raise CLEError(str(exc)) from None
    out = loaded[0].graph.output[0].type.tensor_type
    return rows, out.HasField("shape") and len(out.shape.dim) == 2, notes
