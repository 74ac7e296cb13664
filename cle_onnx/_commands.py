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
from cle_core._backend import warn
from cle_core._check import is_float
from cle_core._quality import describe_arrays, load_inputs, sqnr_db

from . import _io
from ._calibrate import data_inputs, feeds
from ._probes import find_probes
from ._translate import np_dtype

DEFAULT_IMAGE_SIZE = 224  # where the model does not say
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def input_dims(
    vi: onnx.ValueInfoProto, dims: dict[str, int], shapes: dict[str, tuple[int, ...]]
) -> tuple[list[int | None] | None, list[str]]:
    """The sizes of graph input ``vi`` as declared, ``dims`` (``--dim``, by dimension
    name) and ``shapes`` (``--input-shape``, by input name) give them (None where none
    does; None for all when it declares no shape), and what ``shapes`` says that the
    declaration refuses (one line each)."""
    tensor = vi.type.tensor_type
    declared = list(tensor.shape.dim) if tensor.HasField("shape") else None
    if vi.name in shapes:
        given = list(shapes[vi.name])
        flag = f"--input-shape {vi.name}={','.join(map(str, given))}"
        if declared is not None and (
            len(given) != len(declared)
            or any(_size(d) not in (None, g) for d, g in zip(declared, given, strict=True))
        ):
            return given, [f"{flag} does not fit input {vi.name!r} {_shape_text(declared)}"]
        return given, []
    if declared is None:
        return None, []
    return [_size(d) or dims.get(d.dim_param) for d in declared], []


def _size(d) -> int | None:
    """A declared size; None for a dynamic one (named, unnamed or -1, as PaddlePaddle
    writes an unknown size)."""
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def unknown_names(
    model: onnx.ModelProto, dims: dict[str, int], shapes: dict[str, tuple[int, ...]]
) -> list[str]:
    """One line for each ``--input-shape`` input and ``--dim`` dimension name that the
    model does not have: a typo would otherwise be ignored in silence."""
    graph_inputs = data_inputs(model)
    names = [vi.name for vi in graph_inputs]
    params = {d.dim_param for vi in graph_inputs for d in vi.type.tensor_type.shape.dim}
    params.discard("")
    problems = [
        f"--input-shape {name}=...: the model has no input {name!r} (it has {', '.join(names)})"
        for name in shapes
        if name not in names
    ]
    problems += [
        f"--dim {name}=...: no input dimension is named {name!r}"
        + (f" (named: {', '.join(sorted(params))})" if params else "")
        for name in dims
        if name not in params
    ]
    return problems


def missing_sizes(
    model: onnx.ModelProto, dims: dict[str, int], shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, list[int | None] | None], list[str]]:
    """:func:`input_dims` of every data input, and one line for each size that no flag
    gives, each with the flag that gives it: ``--dim NAME=SIZE`` for a named dynamic
    dimension (once per name), ``--input-shape INPUT=...`` where an input has an unnamed
    one or declares no shape."""
    sizes, problems, asked = {}, [], set()
    problems += unknown_names(model, dims, shapes)
    for vi in data_inputs(model):
        known, bad = input_dims(vi, dims, shapes)
        sizes[vi.name] = known
        problems += bad
        tensor = vi.type.tensor_type
        if known is None:
            problems.append(
                f"input {vi.name!r} declares no shape: --input-shape {vi.name}=D0,D1,..."
            )
            continue
        if bad:
            continue
        declared = list(tensor.shape.dim)
        unknown = [i for i, k in enumerate(known) if k is None]
        unnamed = [i for i in unknown if not declared[i].dim_param]
        if unnamed:
            template = ",".join(str(k) if k is not None else f"D{i}" for i, k in enumerate(known))
            axes = ", ".join(map(str, unnamed))
            which = f"dimensions {axes} have" if len(unnamed) > 1 else f"dimension {axes} has"
            problems.append(
                f"input {vi.name!r} {_shape_text(declared)}: {which} no name and no size: "
                f"--input-shape {vi.name}={template}"
            )
            continue
        for i in unknown:
            name = declared[i].dim_param
            if name not in asked:
                asked.add(name)
                problems.append(
                    f"input {vi.name!r} {_shape_text(declared)}: dimension {i} ({name!r}) is "
                    f"dynamic: --dim {name}=SIZE"
                )
    return sizes, problems


def check_feeds(
    model: onnx.ModelProto,
    dims: dict[str, int],
    shapes: dict[str, tuple[int, ...]] | None = None,
    inputs=None,
    seed: int = 0,
) -> dict:
    """The inputs ``--check`` runs both models on: ``inputs`` (an array for a model
    with one input, or a dict of arrays by input name; fed whole, as one run), checked
    and cast as :func:`feeds` does; or, without them, random ones (standard normal, in
    each input's float type) of the sizes the model declares, ``dims`` (``--dim``) and
    ``shapes`` (``--input-shape``) give. Values of an integer or boolean input are never
    made up. Everything that stops the random inputs is said in one :class:`CLEError`,
    each problem with the flag that solves it."""
    if inputs is not None:
        return feeds(model, inputs, "--inputs", whole=True)
    sizes, problems = missing_sizes(model, dims, shapes or {})
    for vi in data_inputs(model):
        elem = vi.type.tensor_type.elem_type
        if elem not in _FLOATS:
            problems.append(
                f"input {vi.name!r} takes {_type_name(elem)} values, which are never made up: "
                "give them with --inputs FILE.npz (arrays by input name)"
            )
    if problems:
        raise CLEError("--check cannot make up the inputs: " + "; ".join(problems))
    rng = np.random.default_rng(seed)
    return {
        vi.name: rng.standard_normal(sizes[vi.name]).astype(np_dtype(vi.type.tensor_type.elem_type))
        for vi in data_inputs(model)
    }


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


def image_size(
    model: onnx.ModelProto,
    dims: dict[str, int] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[int, int]:
    """The (height, width) images are resized to for the model's first input: as
    declared, or as ``dims`` (``--dim``) or ``shapes`` (``--input-shape``) size them;
    224 where none does, with a warning that says so and how to change it."""
    graph_inputs = data_inputs(model)
    if not graph_inputs:
        return (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    vi = graph_inputs[0]
    known, bad = input_dims(vi, dims or {}, shapes or {})
    bad = unknown_names(model, dims or {}, shapes or {}) + bad
    if bad:
        raise CLEError("; ".join(bad))
    hw = list(known[2:4]) if known is not None and len(known) == 4 else [None, None]
    if None in hw:
        which = " and ".join(n for n, k in zip(("height", "width"), hw, strict=True) if k is None)
        hw = [DEFAULT_IMAGE_SIZE if k is None else k for k in hw]
        warn(
            f"input {vi.name!r} has a dynamic {which}: images are resized to "
            f"{hw[0]} x {hw[1]} (--input-shape {vi.name}=N,C,H,W or --dim to change)"
        )
    return hw[0], hw[1]


def fit_channels(images: np.ndarray, model: onnx.ModelProto) -> np.ndarray:
    """RGB ``images`` for the model's first input: averaged to grey for one channel."""
    dims = _first_dims(model)
    channels = dims[1].dim_value if len(dims) == 4 else 0
    if channels == 1 and images.ndim == 4 and images.shape[1] == 3:
        return images.mean(axis=1, keepdims=True).astype(images.dtype)
    return images


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


def read_inputs(
    spec: Path | None,
    src: Path,
    dims: dict[str, int] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
):
    """Inputs for the model in ``src``: from ``spec``, a folder of images (resized as
    :func:`image_size` says, grey for a one-channel input), a .npy array (a model with
    one input) or a .npz of arrays by input name; or, without ``spec``, the sample
    images (:func:`cle_onnx._evaluate.default_inputs`). :class:`CLEError` naming
    ``spec`` for images given to a model whose input is not a float tensor, for one
    array given to a model with several inputs, and for inputs the model cannot take
    (shape, type: see :func:`feeds`)."""
    model = _io.load(src)
    names = [i.name for i in data_inputs(model)]
    if spec is None:
        from ._evaluate import default_inputs

        images = default_inputs(model, dims, shapes)
        return {names[0]: images}
    if len(names) > 1 and Path(spec).suffix != ".npz":
        raise CLEError(
            f"{spec}: the model has {len(names)} inputs ({', '.join(names)}); a folder of "
            "images or a .npy array feeds one: give a .npz of arrays by input name"
        )
    if Path(spec).is_dir():
        check_images_fit(model, str(spec), "give its values in a .npy or .npz file")
        inputs = fit_channels(load_inputs(spec, image_size(model, dims, shapes)), model)
    else:
        inputs = load_inputs(spec, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
    feeds(model, inputs, f"data in {spec}")
    # By name, so that what is printed about them names the input.
    return inputs if isinstance(inputs, dict) else {names[0]: inputs}


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
