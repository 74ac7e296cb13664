"""``cle evaluate``: what quantization does to a model file (and its equalized copy)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .._backend import get_backend_for_file
from .._deployment import Deployment
from .._errors import CLEError
from .._files import temp_folder
from .._quality import describe_arrays, quality_table
from ._common import (
    EXIT_OK,
    INPUTS_METAVAR,
    UsageError,
    add_deployment_flags,
    add_size_options,
    deployment_fields,
    flag_names,
    input_spec,
    parse_dims,
    parse_shapes,
)


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="measure what quantization does to a model file",
        description="Quantize ORIGINAL (and EQUALIZED, if given) as its backend does "
        "(ONNX: onnxruntime's quantize_static, QDQ, MinMax calibration on the inputs; "
        "weights only: quantized weight values) and print the output SQNR and top-1 "
        "agreement against the FP32 ORIGINAL. The deployment flags are those of cle "
        "equalize; the defaults are quantize_static's (symmetric int8 weights per tensor, "
        "asymmetric uint8 activations).",
    )
    ev.add_argument("original", metavar="ORIGINAL")
    ev.add_argument("equalized", metavar="EQUALIZED", nargs="?")
    ev.add_argument(
        "--inputs",
        metavar=INPUTS_METAVAR,
        help="a folder of images, a .npy array (a model with one input) or a .npz of "
        "arrays by input name (default: the 120 sample images of scikit-image at the "
        "model's input size)",
    )
    add_size_options(ev, "for images")
    ev.add_argument(
        "--bits",
        type=int,
        default=8,
        help="bits for weights and activations: 4, 8 or 16 with activations (what "
        "onnxruntime offers), 2 to 16 with --weights-only (default: %(default)s)",
    )
    add_deployment_flags(ev)
    ev.add_argument(
        "--symmetric",
        action="store_true",
        help="symmetric weight and activation grids (as --symmetric-activations)",
    )
    ev.add_argument(
        "--calibration",
        metavar=INPUTS_METAVAR,
        help="inputs quantize_static calibrates on (default: the --inputs themselves)",
    )
    ev.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")
    ev.set_defaults(run=run)


def run(args) -> int:
    if args.bits < 2 or args.bits > 16:
        raise UsageError("--bits must be between 2 and 16")
    paths = [Path(p) for p in (args.original, args.equalized) if p]
    backend = get_backend_for_file(paths[0])
    fields = deployment_fields(args)
    if args.symmetric:
        fields["activation_symmetric"] = fields["weight_symmetric"] = True
    try:
        deployment = Deployment(
            weight_bits=args.bits,
            activation_bits=None if args.weights_only else args.bits,
            **{k: v for k, v in fields.items() if k != "activation_bits"},
        )
    except CLEError as exc:
        bits = {"weight_bits": "--bits", "activation_bits": "--bits"}
        raise UsageError(flag_names(str(exc), bits)) from None
    dims, shapes = parse_dims(args.dim), parse_shapes(args.input_shape)
    spec = input_spec(args.inputs, "--inputs") if args.inputs else None
    # Without --inputs, the backend's default inputs (None: it makes them itself).
    inputs = backend.read_inputs(spec, paths[0], dims, shapes)
    if inputs is not None:
        source = f"from {args.inputs}" if spec else "(default)"
        print(f"evaluate: inputs {source}: {describe_arrays(inputs)}")
    calibration = None
    if args.calibration:
        spec = input_spec(args.calibration, "--calibration")
        calibration = backend.read_inputs(spec, paths[0], dims, shapes)
        print(f"evaluate: calibration from {args.calibration}: {describe_arrays(calibration)}")
    with _all_temporary_files_in_one_folder():
        rows, classifier, notes = backend.evaluate_files(
            paths,
            inputs,
            deployment=deployment,
            calibration=calibration,
            batch=args.batch,
        )
    print(quality_table(rows, args.bits, classifier=classifier))
    for note in notes:
        print(note)
    return EXIT_OK


@contextlib.contextmanager
def _all_temporary_files_in_one_folder() -> Iterator[None]:
    """Quantizers write temporary copies of the model (onnxruntime's into folders of
    their own naming), which a SIGKILL would leave behind. Inside a folder that carries
    this process's id, all of it is removed on exit, SIGINT and SIGTERM included, and by
    the next ``cle`` run after a SIGKILL. The command owns its process, so pointing
    ``tempfile`` there for its duration is safe."""
    with temp_folder("eval") as folder:
        previous, tempfile.tempdir = tempfile.tempdir, str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = previous
