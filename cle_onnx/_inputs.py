"""A model's inputs, for the command line and the evaluation: what its graph inputs
declare and what ``--dim`` / ``--input-shape`` size, the inputs a user gives (images,
``.npy``, ``.npz``) read and fitted, the random ones ``--check`` makes (never for integer
or boolean inputs), and the sample images ``cle evaluate`` uses by default. No model is
run here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from cle_core import CLEError
from cle_core.quality import natural_images
from cle_core.toolkit import load_inputs, warn

from . import _io
from ._calibrate import data_inputs, feeds
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
    return [_size(d) or dims.get(_name(d)) for d in declared], []


def _name(d) -> str:
    """The name of a dynamic dimension, or "" where it has none: empty, or ``?`` as
    several exporters write an unnamed one (one name for every such axis)."""
    return "" if d.dim_param in ("", "?") else d.dim_param


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
    params = {_name(d) for vi in graph_inputs for d in vi.type.tensor_type.shape.dim}
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
    model: onnx.ModelProto,
    dims: dict[str, int],
    shapes: dict[str, tuple[int, ...]],
    first_axis: int | None = None,
) -> tuple[dict[str, list[int | None] | None], list[str]]:
    """:func:`input_dims` of every data input, and one line for each size that no flag
    gives, each with the flag that gives it: ``--dim NAME=SIZE`` for a named dynamic
    dimension (once per name), ``--input-shape INPUT=...`` where an input has an unnamed
    one or declares no shape. ``first_axis``: the size of a dynamic first axis (the
    batch, as good as any for ``--check``) that no flag sizes; its name, if it has
    one, gets that size wherever it appears (a recurrent state's batch axis)."""
    sizes, problems, asked = {}, [], set()
    problems += unknown_names(model, dims, shapes)
    if first_axis is not None:
        dims = dict(dims)
        for vi in data_inputs(model):
            declared = vi.type.tensor_type.shape.dim
            if vi.name not in shapes and declared and _size(declared[0]) is None:
                if _name(declared[0]):
                    dims.setdefault(_name(declared[0]), first_axis)
    for vi in data_inputs(model):
        known, bad = input_dims(vi, dims, shapes)
        if first_axis is not None and known and known[0] is None and vi.name not in shapes:
            known[0] = first_axis
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
        if not unknown:
            continue
        names = [_name(declared[i]) for i in unknown]
        if all(names):
            flags = [f"--dim {n}=SIZE" for n in dict.fromkeys(names) if n not in asked]
            asked.update(names)
            if flags:
                axes = ", ".join(f"{i} ({n!r})" for i, n in zip(unknown, names, strict=True))
                which = f"dimensions {axes} are" if len(unknown) > 1 else f"dimension {axes} is"
                problems.append(
                    f"input {vi.name!r} {_shape_text(declared)}: {which} dynamic: "
                    + " ".join(flags)
                )
            continue
        # One flag sizes them all, named or not.
        template = ",".join(str(k) if k is not None else f"D{i}" for i, k in enumerate(known))
        axes = ", ".join(map(str, unknown))
        which = f"dimensions {axes} have" if len(unknown) > 1 else f"dimension {axes} has"
        problems.append(
            f"input {vi.name!r} {_shape_text(declared)}: {which} no size: "
            f"--input-shape {vi.name}={template}"
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
    ``shapes`` (``--input-shape``) give, a dynamic first axis that none sizes being 1
    (a batch of one example: any size the model takes compares the two). Values of an
    integer or boolean input are never made up. Everything that stops the random inputs
    is said in one :class:`CLEError`, each problem with the flag that solves it."""
    if inputs is not None:
        return feeds(model, inputs, "--inputs", whole=True)
    sizes, problems = missing_sizes(model, dims, shapes or {}, first_axis=1)
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
    images (:func:`default_inputs`). :class:`CLEError` naming
    ``spec`` for images given to a model whose input is not a float tensor, for one
    array given to a model with several inputs, and for inputs the model cannot take
    (shape, type: see :func:`feeds`)."""
    model = _io.load(src)
    names = [i.name for i in data_inputs(model)]
    if spec is None:
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


def default_inputs(
    model: onnx.ModelProto,
    dims: dict[str, int] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """The default evaluation batch for ``model``: the 120 natural images at the height
    and width of its single NCHW input, as declared or as ``dims`` (by dimension name)
    and ``shapes`` (by input name) size them (224 where none does, with a warning),
    averaged to grey for a one-channel input."""
    graph_inputs = data_inputs(model)
    if len(graph_inputs) != 1:
        raise CLEError(
            f"the sample images feed one input; the model has {len(graph_inputs)} inputs "
            f"({', '.join(i.name for i in graph_inputs)}): give them with --inputs "
            "FILE.npz, arrays by input name (Python: inputs= a dict)"
        )
    check_images_fit(
        model,
        "the sample images",
        "give its values with --inputs FILE.npy or FILE.npz (Python: inputs=)",
    )
    dims_ = graph_inputs[0].type.tensor_type.shape.dim
    if len(dims_) != 4:
        raise CLEError(
            f"the sample images are NCHW, input {graph_inputs[0].name!r} has rank "
            f"{len(dims_)}: give its values with --inputs FILE.npy (Python: inputs=)"
        )
    if dims_[1].HasField("dim_value") and dims_[1].dim_value not in (0, 1, 3):
        raise CLEError(
            f"the sample images are RGB or grey, input {graph_inputs[0].name!r} has "
            f"{dims_[1].dim_value} channels: give its values with --inputs FILE.npy "
            "(Python: inputs=)"
        )
    return fit_channels(natural_images(size=image_size(model, dims, shapes)), model)
