"""What quantization does to an ONNX model, measured with onnxruntime's own quantizer.

Users deploy ONNX models with ``onnxruntime.quantization``, so that is what the figures
come from: the model goes through onnxruntime's recommended pre-processing
(``quant_pre_process``: shape inference, graph optimization, batch norms fused into
their convolutions), then

- W+A: ``quantize_static`` in QDQ format with MinMax calibration on the evaluation
  inputs (a calibration data reader over the same batches) or on separate calibration
  inputs, with the grids of a :class:`cle_core.Deployment` (by default
  ``quantize_static``'s own: symmetric int8 weights per tensor, asymmetric uint8
  activations); 4, 8 or 16 bits;
- weights only: onnxruntime has no such mode, so each Conv / ConvTranspose / Gemm /
  MatMul weight initializer is replaced by its quantized-and-dequantized values
  (:func:`cle_core.quality.weights_on_grid`: ``quantize_static``'s grid bit for bit at
  4, 8 and 16 bits, per-channel grids symmetric as it makes them; the min/max grid at
  any other width).

Every variant's first output is compared with the FP32 model's
(:func:`cle_core.quality.compare_outputs`). Nothing here knows about CLE.

onnxruntime's quantizer takes float32 models (it writes a float16 model's weights as
activations behind the Casts its optimizer inserts, and float16 scales it cannot run),
so a float16 model is quantized as its float32 copy: every float16 value is exact in
float32. Its FP32 column is the model itself, in float16.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper, version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from cle_core import CLEError, Deployment
from cle_core.quality import compare_outputs, weights_on_grid
from cle_core.toolkit import deployment_of, describe_arrays, temp_folder

from ._calibrate import batch_axes, examples, feeds, fixed_batch, take
from ._inputs import check_same_io, default_inputs
from ._translate import default_opset

__all__ = [
    "default_inputs",
    "evaluate",
    "evaluate_all",
    "prepared",
    "run",
    "static_quantized",
]

QDQ_OPSET = 13  # per-channel QuantizeLinear needs 13: an older model is converted first
_TYPES = {  # bits -> (signed, unsigned) onnxruntime types
    4: (QuantType.QInt4, QuantType.QUInt4),
    8: (QuantType.QInt8, QuantType.QUInt8),
    16: (QuantType.QInt16, QuantType.QUInt16),
}
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}  # Gemm: from transB
_log = logging.getLogger(__name__)


# -- running ------------------------------------------------------------------------------


def _one_line(exc: Exception) -> str:
    """onnxruntime's messages span lines; an error of ``cle`` is one."""
    return " ".join(str(exc).split()) or exc.__class__.__name__


_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _session(model: onnx.ModelProto, name: str, optimized: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    # A quantized model runs with basic optimizations, which keep QuantizeLinear /
    # DequantizeLinear as float simulation instead of fusing them into integer kernels.
    # A float model (FP32, weights-only) runs with all of them: twice as fast on
    # EfficientNet-Lite0, and its outputs agree with the basic level's to ~120 dB,
    # float rounding far below any figure measured here.
    quantized = any(n.op_type in _QDQ for n in model.graph.node)
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not optimized
        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if quantized
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    # 4 (fatal only): a run that fails raises, and says it once, in our one line
    opts.log_severity_level = 4
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise CLEError(f"onnxruntime cannot load {name}: {_one_line(exc)}") from None


def _batches(model: onnx.ModelProto, fed: dict, batch: int) -> Iterator[tuple[dict, int]]:
    """Chunks of ``fed`` (each input split along its batch axis, see
    :func:`cle_onnx._calibrate.batch_axes`) and their real example counts. A model with
    a fixed batch dimension gets chunks of that size, the last one padded by repeating
    its last example (whose results are dropped)."""
    if batch < 1:
        raise CLEError(f"batch must be positive, got {batch}")
    axes = batch_axes(model)
    n = examples(fed, axes)
    fixed = fixed_batch(model)
    step = fixed or batch
    for start in range(0, n, step):
        chunk = take(fed, axes, start, start + step)
        real = min(step, n - start)
        if fixed and real < fixed:
            chunk = {
                k: v
                if axes[k] is None
                else np.concatenate(
                    [v, np.repeat(np.take(v, [-1], axis=axes[k]), fixed - real, axis=axes[k])],
                    axis=axes[k],
                )
                for k, v in chunk.items()
            }
        yield chunk, real


def run(
    model: onnx.ModelProto,
    inputs=None,
    batch: int = 16,
    name: str = "the model",
    optimized: bool = True,
) -> np.ndarray:
    """The model's first output on ``inputs``, run in batches with onnxruntime (CPU).

    ``inputs``: a dict from input name to an array with the batch in axis 0, or one
    array for a single-input model (None: :func:`default_inputs`). ``name`` names the
    model in the :class:`CLEError` raised when onnxruntime cannot run it or its output
    has no batch axis. ``optimized=False`` runs it with onnxruntime's graph
    optimizations off: the arithmetic as the graph writes it (for measurements on
    graphs no deployment has, such as a QDQ graph with float weights)."""
    fed = feeds(model, default_inputs(model) if inputs is None else inputs)
    session = _session(model, name, optimized)
    first = session.get_outputs()[0].name
    parts = []
    axes = batch_axes(model)
    for chunk, real in _batches(model, fed, batch):
        rows = examples(chunk, axes)
        try:
            out = np.asarray(session.run([first], chunk)[0])
        except Exception as exc:
            raise CLEError(
                f"onnxruntime cannot run {name} on inputs {describe_arrays(chunk)}: "
                f"{_one_line(exc)}"
            ) from None
        # The rows are cut, padded and compared example by example: along axis 0.
        if out.ndim == 0 or out.shape[0] != rows:
            raise CLEError(
                f"{name}: output {first!r} has shape {out.shape} on a batch of {rows}; "
                "evaluation compares outputs example by example, the batch in axis 0"
            )
        parts.append(out[:real])
    return np.concatenate(parts, axis=0)


# -- quantizing ---------------------------------------------------------------------------


def evaluable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy converted to opset 13 if older (QDQ needs it)."""
    if default_opset(model) >= QDQ_OPSET:
        return model
    try:
        return version_converter.convert_version(model, QDQ_OPSET)
    except Exception as exc:
        raise CLEError(
            f"cannot convert the opset-{default_opset(model)} model to {QDQ_OPSET} for "
            f"quantization: {exc}"
        ) from None


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy with every float16 tensor, value type, Cast and dtype
    attribute made float32 (subgraphs included) if it has any: what onnxruntime's
    quantizer takes. Its optimizer would otherwise run float16 layers behind inserted
    Casts, whose outputs the quantizer treats as activations, never as weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out if _upcast(out.graph) else model


def _upcast(graph: onnx.GraphProto) -> bool:
    changed = False

    def tensor(t: onnx.TensorProto) -> None:
        nonlocal changed
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            changed = True

    for t in graph.initializer:
        tensor(t)
    for sparse in graph.sparse_initializer:
        tensor(sparse.values)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
            changed = True
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                tensor(a.t)
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    tensor(t)
            elif a.type == onnx.AttributeProto.GRAPH:
                changed |= _upcast(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    changed |= _upcast(g)
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype"):  # Cast, Random*
                if a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.FLOAT
                    changed = True
    return changed


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """What a deployment quantizes: :func:`evaluable` ``model`` (float32, see
    :func:`as_float32`) after onnxruntime's ``quant_pre_process`` (shape inference,
    graph optimization, batch norms fused). A model the pre-processing cannot take is
    quantized as it is (logged)."""
    model = as_float32(evaluable(model))
    with temp_folder("eval") as tmp:
        raw, out = tmp / "raw.onnx", tmp / "prepared.onnx"
        onnx.save(model, str(raw))
        try:
            with _quiet():
                quant_pre_process(str(raw), str(out), skip_symbolic_shape=True)
            return onnx.load(str(out))
        except Exception as exc:  # onnxruntime's optimizer refusing an op, say
            _log.warning("quant_pre_process failed (%s); quantizing the model as it is", exc)
            return model


def weight_axis(node: onnx.NodeProto) -> int:
    """The axis of a Conv / ConvTranspose / Gemm / MatMul weight that holds its output
    channels: onnxruntime's per-channel axis (a Gemm's from ``transB``)."""
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return _WEIGHT_AXIS[node.op_type]


def rounded_weights(
    graph: onnx.GraphProto,
) -> Iterator[tuple[onnx.NodeProto, onnx.TensorProto, np.ndarray]]:
    """``(node, initializer, values)`` of every weight a weights-only deployment rounds:
    each float Conv / ConvTranspose / Gemm / MatMul weight initializer of at least two
    dimensions, once (with the first node that reads it), in graph order."""
    inits = {t.name: t for t in graph.initializer}
    done: set[str] = set()
    for node in graph.node:
        if node.op_type not in (*_WEIGHT_AXIS, "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or name in done:
            continue
        done.add(name)
        w = numpy_helper.to_array(inits[name])
        if w.dtype.kind == "f" and w.ndim >= 2:
            yield node, inits[name], w


def weights_quantized(
    model: onnx.ModelProto, bits: int = 8, per_channel: bool = False, symmetric: bool = True
) -> onnx.ModelProto:
    """A copy with every Conv / ConvTranspose / Gemm / MatMul weight initializer replaced
    by its quantized-and-dequantized values (activations stay float)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node, tensor, w in list(rounded_weights(out.graph)):
        axis = weight_axis(node)
        q = weights_on_grid(w, bits, symmetric, axis if per_channel else None)
        tensor.CopyFrom(numpy_helper.from_array(q.astype(w.dtype), tensor.name))
    return out


class _Reader(CalibrationDataReader):
    """The evaluation batches, once, for MinMax calibration."""

    def __init__(self, model: onnx.ModelProto, fed: dict, batch: int):
        self._chunks = iter([chunk for chunk, _ in _batches(model, fed, batch)])

    def get_next(self):
        return next(self._chunks, None)


def static_quantized(
    model: onnx.ModelProto,
    inputs,
    bits: int | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    batch: int = 16,
    name: str = "the model",
    deployment: Deployment | None = None,
) -> onnx.ModelProto:
    """``model`` (see :func:`prepared`) quantized by onnxruntime's ``quantize_static``:
    QDQ format, MinMax calibration on ``inputs``, the grids of ``deployment`` (default:
    quantize_static's own, 8-bit symmetric weights and asymmetric activations; ``bits``,
    ``per_channel`` and ``symmetric`` change it; 4, 8 or 16 bits). ``name`` names the
    model in the :class:`CLEError` raised when the quantizer fails."""
    dep = deployment_of(deployment, bits, per_channel, symmetric, True)
    bits = dep.weight_bits
    _check_bits(bits)
    if dep.activation_bits != bits:
        raise CLEError(
            f"onnxruntime's quantize_static takes one width, not W{bits}A{dep.activation_bits}"
        )
    signed, unsigned = _TYPES[bits]
    per_channel = dep.per_channel
    model = as_float32(model)
    fed = feeds(model, inputs)
    with temp_folder("eval") as tmp:
        src, dst = tmp / "fp32.onnx", tmp / "qdq.onnx"
        onnx.save(model, str(src))
        try:
            with _quiet():
                quantize_static(
                    str(src),
                    str(dst),
                    _Reader(model, fed, batch),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=signed if dep.activation_symmetric else unsigned,
                    weight_type=signed,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={
                        "ActivationSymmetric": dep.activation_symmetric,
                        "WeightSymmetric": dep.weight_symmetric,
                    },
                )
        # Its calibrator asserts and raises whatever it meets (NaN ranges: "scale
        # issue"); that is a fact about this model and these inputs, not a crash.
        except Exception as exc:
            raise CLEError(
                f"{name}: onnxruntime's quantize_static failed: {_one_line(exc)}"
            ) from None
        return onnx.load(str(dst))


def input_grid_only(model: onnx.ModelProto, quantized: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` (float, as :func:`prepared` left it) with only the grids that its QDQ
    form ``quantized`` (:func:`static_quantized`) puts on the graph's inputs: each input
    rounded exactly as the deployed model rounds it, every weight and every other
    activation in float. None when ``quantized`` rounds no graph input.

    Equalization cannot change this rounding: it happens before the first layer, and
    an equalized model computes the same function, so its error reaches the output the
    same way at any scales. Its SQNR is a floor under the deployment's noise that no
    scaling lowers (on Lite0's 120 sample images 18.8 dB W8A8, see docs/benchmarks.rst)."""
    # (an input that is also a graph output is left as it was given: not rounded)
    names = {vi.name for vi in model.graph.input} - {vi.name for vi in model.graph.output}
    params = {t.name: t for t in quantized.graph.initializer}
    made = {o: n for n in quantized.graph.node for o in n.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    front, renamed = [], {}
    for dq in quantized.graph.node:
        q = made.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in names:
            continue
        name = q.input[0]
        if name in renamed:  # one grid per input
            continue
        rounded = f"{name}__cle_input_grid"
        nodes = []
        for node, src, dst in ((q, name, f"{rounded}_q"), (dq, f"{rounded}_q", rounded)):
            args = [src]
            for arg in node.input[1:]:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(params[arg])
                tensor.name = f"{rounded}_{node.op_type}_{arg}"
                out.graph.initializer.append(tensor)
                args.append(tensor.name)
            clone = onnx.helper.make_node(node.op_type, args, [dst], name=dst, domain=node.domain)
            clone.attribute.extend(node.attribute)
            nodes.append(clone)
        front += nodes
        renamed[name] = rounded
    if not renamed:
        return None
    for node in out.graph.node:
        for i, arg in enumerate(node.input):
            node.input[i] = renamed.get(arg, arg)
    kept = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(front + kept)
    return out


def _check_bits(bits: int) -> None:
    if bits not in _TYPES:
        raise CLEError(
            f"onnxruntime quantizes weights and activations to 4, 8 or 16 bits, not {bits} "
            "(weights only takes any width)"
        )


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantization tools log advice at INFO / WARNING on the root logger;
    the evaluation's caller wants figures, not that."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


# -- evaluating ---------------------------------------------------------------------------


def evaluate(
    fp32_model: onnx.ModelProto,
    candidate_model: onnx.ModelProto | None = None,
    inputs=None,
    bits: int | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    activations: bool | None = None,
    batch: int = 16,
    reference: np.ndarray | None = None,
    *,
    deployment: Deployment | None = None,
    calibration=None,
) -> dict[str, float]:
    """What onnxruntime's quantization does to ``candidate_model`` (default:
    ``fp32_model`` itself, e.g. an equalized copy otherwise), against ``fp32_model`` in
    FP32 on ``inputs`` (default :func:`default_inputs`). ``reference``: ``fp32_model``'s
    first output on ``inputs``, where the caller has it already.

    The grids are ``deployment``'s (default :class:`cle_core.Deployment`, onnxruntime
    ``quantize_static``'s own defaults: 8-bit symmetric weights per tensor, 8-bit
    asymmetric activations); ``bits`` (weights and activations), ``per_channel``,
    ``symmetric`` (weights and activations) and ``activations=False`` (weights only)
    change it. ``calibration``: the inputs ``quantize_static`` calibrates on (default:
    ``inputs``).

    Returns, for ``N`` weight bits:

    - ``fp32_sqnr``, ``fp32_top1``: the candidate unquantized (inf and 1.0 without one);
    - ``wN_sqnr``, ``wN_top1``: SQNR in dB and top-1 agreement with N-bit weights and
      float activations;
    - ``wNaN_sqnr``, ``wNaN_top1``: ``quantize_static`` with N-bit weights and
      activations (unless weights only; N in 4, 8, 16).
    """
    names = ["the FP32 model", "the FP32 model" if candidate_model is None else "the candidate"]
    return evaluate_all(
        fp32_model,
        [candidate_model],
        inputs,
        bits,
        per_channel,
        symmetric,
        activations,
        batch,
        reference,
        names=names,
        deployment=deployment,
        calibration=calibration,
    )[0]


def evaluate_all(
    fp32_model: onnx.ModelProto,
    candidates: list[onnx.ModelProto | None],
    inputs=None,
    bits: int | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    activations: bool | None = None,
    batch: int = 16,
    reference: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    *,
    deployment: Deployment | None = None,
    calibration=None,
    progress: Callable[[int, str], None] | None = None,
    input_grid: bool = False,
    deployed_only: bool = False,
) -> list[dict[str, float]]:
    """:func:`evaluate` for each of ``candidates`` (None: ``fp32_model`` itself), with
    the inputs and the FP32 reference computed once. ``names``: of ``fp32_model`` and
    of each candidate, for the errors (default "the FP32 model", "candidate 1" ...).
    ``progress(i, name)`` is called before candidate ``i`` is measured. With
    ``input_grid`` and activations quantized, each result also has ``input_grid_sqnr``
    and ``input_grid_top1``: the candidate with only its inputs rounded as the deployed
    model rounds them (:func:`input_grid_only`; absent where no input is rounded). With
    ``deployed_only`` each result has the deployment's own figure alone (``wNaN_*``, or
    ``wN_*`` for weights only): the candidates are not run in FP32, nor with their
    weights alone where activations are quantized (``verify`` reads that one figure;
    the other runs were a third to a half of its time).

    Raises :class:`CLEError` for a candidate that does not take the FP32 model's inputs
    or give its output's shape, inputs that do not fit (:func:`feeds`), a first output
    without a batch axis or not finite on the inputs, and a quantizer that fails."""
    dep = deployment_of(deployment, bits, per_channel, symmetric, activations)
    bits = dep.weight_bits
    activations = not dep.weights_only
    if activations:  # refused before any model runs
        _check_bits(bits)
    if names is None:
        names = ["the FP32 model", *(f"candidate {i + 1}" for i in range(len(candidates)))]
    fp32_name, models = names[0], [(fp32_model, names[0])]
    for candidate, name in zip(candidates, names[1:], strict=True):
        if candidate is not None:
            check_same_io(fp32_model, candidate, fp32_name, name)
            models.append((candidate, name))
    for model, name in models:
        _check_batched_output(model, name)
    if inputs is None:
        inputs = default_inputs(fp32_model)
    if reference is None:
        reference = run(fp32_model, inputs, batch, fp32_name)
    if reference.dtype.kind in "fc" and not np.all(np.isfinite(reference)):
        # NaN or Inf make every SQNR NaN, and onnxruntime's calibrator fails on them.
        raise CLEError(
            f"{fp32_name}: output {fp32_model.graph.output[0].name!r} is NaN or Inf on "
            "the inputs; nothing to measure quantization against"
        )
    results = []
    for i, (candidate, name) in enumerate(zip(candidates, names[1:], strict=True)):
        if progress is not None:
            progress(i, name)
        model, name = (fp32_model, fp32_name) if candidate is None else (candidate, name)
        outputs = {}
        if not deployed_only:
            outputs["fp32"] = reference if candidate is None else run(model, inputs, batch, name)
            _check_fits(outputs["fp32"], reference, name, fp32_name)
        ready = prepared(model)
        if not (deployed_only and activations):
            weights = weights_quantized(ready, bits, dep.per_channel, dep.weight_symmetric)
            outputs[f"w{bits}"] = run(weights, inputs, batch, f"{name} (W{bits})")
        if activations:
            quantized = static_quantized(
                ready,
                inputs if calibration is None else calibration,
                batch=batch,
                name=name,
                deployment=dep,
            )
            outputs[f"w{bits}a{bits}"] = run(quantized, inputs, batch, f"{name} (W{bits}A{bits})")
            floor = input_grid_only(ready, quantized) if input_grid else None
            if floor is not None:
                outputs["input_grid"] = run(floor, inputs, batch, f"{name} (input grid)")
        if deployed_only:  # (otherwise checked on its FP32 output, before quantizing)
            _check_fits(next(iter(outputs.values())), reference, name, fp32_name)
        results.append(compare_outputs(reference, outputs))
    return results


def _check_fits(output: np.ndarray, reference: np.ndarray, name: str, fp32_name: str) -> None:
    """Refuse a candidate whose output does not have the FP32 model's shape."""
    if output.shape != reference.shape:
        raise CLEError(
            f"{name} does not fit {fp32_name}: its output has shape "
            f"{output.shape} on the inputs, not {reference.shape}"
        )


def _check_batched_output(model: onnx.ModelProto, name: str) -> None:
    """Refuse a first output declared as a scalar: it has no example to compare."""
    out = model.graph.output[0]
    tensor = out.type.tensor_type
    if tensor.HasField("shape") and not tensor.shape.dim:
        raise CLEError(
            f"{name}: output {out.name!r} is a scalar; evaluation compares outputs example "
            "by example, the batch in axis 0"
        )
