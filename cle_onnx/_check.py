"""``cle equalize --check`` for ONNX files: run the original and the result in
onnxruntime on the same inputs (see :mod:`cle_onnx._inputs`) and compare every graph
output, or, behind a discontinuous operation, the values before it
(:func:`cle_onnx._probes.find_probes`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx

from cle_core import CLEError, OutputCheck, Probe
from cle_core.quality import sqnr_db
from cle_core.toolkit import describe_arrays, is_float_dtype

from ._probes import find_probes


def run_once(src: Path, feeds: dict) -> None:
    """Run the model file ``src`` on ``feeds`` in onnxruntime; a :class:`CLEError`
    naming the inputs and their shapes where it refuses them (one line: onnxruntime's
    messages span several)."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise CLEError("--check needs onnxruntime: pip install 'crosslayer-eq[onnx]'") from None
    opts = ort.SessionOptions()
    # 4 (fatal only): a run that fails raises, and says it once, in our one line
    opts.log_severity_level = 4
    # Loaded with its external data where small enough: onnxruntime's shape inference
    # cannot read a constant (Squeeze axes) stored in an external file.
    model = _load_small(src)
    if model is not None:
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    runnable = str(src) if model is None else model.SerializeToString()
    try:
        sess = ort.InferenceSession(runnable, opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
    except Exception as exc:
        # onnxruntime's own errors are facts about the model and the inputs; anything
        # else is a bug of ours.
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise CLEError(
            f"--check: onnxruntime cannot run {src} on inputs {describe_arrays(feeds)}: {text}"
        ) from None


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
        found = [p for p in found if is_float_dtype(np.asarray(a[p.value]).dtype)]
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
    if is_float_dtype(ya.dtype) or ya.shape != yb.shape:
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
