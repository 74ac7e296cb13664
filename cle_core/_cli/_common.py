"""What every ``cle`` command shares: exit codes, usage errors, the progress bar, the CLE
options and the argument helpers."""

from __future__ import annotations

import argparse
import math
import re
import sys
import threading
import time
from pathlib import Path

from .._deployment import profile_names
from .._errors import CLEError
from .._objectives import get_objective, objective_names
from .._report import EqualizeOptions

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CHECK_FAILED = 1
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE


class UsageError(CLEError):
    """Bad command-line usage that argparse cannot see."""


class Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread so that clean-up runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class Progress:
    """A progress bar on stderr, shown only on a terminal and only once the work has
    taken longer than ``delay`` seconds."""

    def __init__(self, enabled: bool | None = None, delay: float = 2.0, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = delay
        self.stage, self.fraction = "starting", 0.0
        self.start = time.monotonic()
        self.shown = False
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def update(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, max(self.fraction, min(1.0, fraction))

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            elapsed = time.monotonic() - self.start
            if elapsed < self.delay:
                continue
            width = 30
            filled = int(round(self.fraction * width))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(
                f"\r[{bar}] {self.fraction * 100:3.0f}% {self.stage} ({elapsed:.0f} s)\x1b[K"
            )
            self.stream.flush()
            self.shown = True


def add_verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list every skipped candidate and every layer, not only the summary",
    )


def add_cle_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("equalization")
    g.add_argument("--no-fold", action="store_true", help="do not fold batch norms")
    g.add_argument("--no-scale", action="store_true", help="do not run cross-layer scaling")
    g.add_argument("--no-high-bias", action="store_true", help="turn off high-bias absorption")
    g.add_argument(
        "--high-bias-form",
        choices=("exact", "classic"),
        default="exact",
        help="exact (default) moves the shift into the activation's lower bound; "
        "classic keeps it at 0 and changes FP32 outputs (the report says how much)",
    )
    g.add_argument(
        "--high-bias-through-padding",
        action="store_true",
        help="also absorb into layers that zero-pad the activation (inexact at borders)",
    )
    g.add_argument(
        "--bias-correction",
        nargs="?",
        const="analytic",
        default=False,
        choices=("analytic", "empirical"),
        help="after scaling, subtract from each bias the mean shift that rounding its "
        "weights to the deployment's grid adds: analytic (the default form) from the input "
        "means (the batch norms', or measured with --calibration); empirical: measured "
        "layer by layer on the --calibration inputs with the layers before already rounded "
        "(one run of the model per layer). Changes FP32 outputs by design",
    )
    g.add_argument(
        "--objective",
        choices=objective_names(),
        default="noise",
        help="; ".join(f"{n}: {get_objective(n).description}" for n in objective_names()),
    )
    g.add_argument(
        "--weight-bits",
        type=int,
        default=EqualizeOptions.weight_bits,
        metavar="N",
        help="bits of the weight grids you deploy with (default: %(default)s)",
    )
    g.add_argument(
        "--activation-bits",
        type=bits_or_none,
        default=EqualizeOptions.activation_bits,
        metavar="N|none",
        help="bits of the activation grids, or 'none' for weights-only quantization "
        "(default: %(default)s)",
    )
    add_deployment_flags(g)
    g.add_argument(
        "--quantizer",
        choices=profile_names(),
        default=EqualizeOptions.quantizer,
        help="whose activation grids the scales are chosen for: onnxruntime "
        "(quantize_static's QDQ placement, the default), torchao-x86 (PyTorch PT2E's "
        "X86InductorQuantizer: grids on layer inputs only), or a profile a plugin "
        "registered (cle evaluate measures with onnxruntime whatever this says)",
    )
    g.add_argument(
        "--activation-weight",
        type=float,
        default=EqualizeOptions.activation_weight,
        metavar="W",
        help="--objective balance only (deprecated): weight of estimated activation ranges "
        "as extra sources (default: %(default)s)",
    )
    g.add_argument(
        "--max-sweeps",
        type=int,
        default=EqualizeOptions.max_sweeps,
        metavar="N",
        help="most sweeps over all regions (default: %(default)s)",
    )
    g.add_argument(
        "--scale-draw",
        type=int,
        default=EqualizeOptions.scale_draw,
        metavar="K",
        help="each channel's scale times exp(0.02 z), z drawn with seed K: another exact "
        "equalization with other rounding errors (0, the default: the objective's own "
        "scales; equalize --verify --draws N measures several and keeps the best)",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="T",
        help="stop when a sweep lowers the noise estimate by less than the fraction T "
        "(default 0.003), or, with --objective balance, when no scale changes by more "
        "than T (default 1e-4)",
    )


def add_deployment_flags(g) -> None:
    """The flags that describe the deployment, the same for ``equalize``, ``inspect`` and
    ``evaluate``: what the scales are chosen for is what is measured."""
    g.add_argument(
        "--per-channel",
        action="store_true",
        help="one weight grid per output channel (default: one per tensor)",
    )
    g.add_argument(
        "--weights-only",
        action="store_true",
        help="quantize weights only; activations stay float (as --activation-bits none)",
    )
    g.add_argument(
        "--asymmetric-weights",
        action="store_true",
        help="weight grids from min to max (default: symmetric about 0, as onnxruntime "
        "quantizes int8 weights)",
    )
    g.add_argument(
        "--symmetric-activations",
        action="store_true",
        help="activation grids symmetric about 0, int8 (default: asymmetric, uint8)",
    )


def deployment_fields(args) -> dict:
    """The :class:`cle_core.Deployment` fields the deployment flags set."""
    fields = {
        "per_channel": args.per_channel,
        "weight_symmetric": not args.asymmetric_weights,
        "activation_symmetric": args.symmetric_activations,
    }
    if args.weights_only:
        fields["activation_bits"] = None
    return fields


def cle_options(args) -> EqualizeOptions:
    activation_bits = args.activation_bits
    if args.weights_only:
        if activation_bits not in (None, EqualizeOptions.activation_bits):
            raise UsageError("give --weights-only or --activation-bits N, not both")
        activation_bits = None
    try:
        return EqualizeOptions(
            fold_bn=not args.no_fold,
            scale=not args.no_scale,
            high_bias=not args.no_high_bias,
            high_bias_form=args.high_bias_form,
            high_bias_through_padding=args.high_bias_through_padding,
            objective=args.objective,
            weight_bits=args.weight_bits,
            max_sweeps=args.max_sweeps,
            tolerance=args.tolerance,
            activation_weight=args.activation_weight,
            bias_correction=args.bias_correction,
            quantizer=args.quantizer,
            scale_draw=args.scale_draw,
            **{**deployment_fields(args), "activation_bits": activation_bits},
        )
    except CLEError as exc:  # a bad value of a flag: name the flag, not the field
        raise UsageError(flag_names(str(exc))) from None


# The Python spellings in the core's messages, as the flags spell them; a phrase before
# the names in it ("activation_bits=None" before "activation_bits").
_FLAGS = {
    "objective='balance'": "--objective balance",
    "activation_bits=None": "--weights-only",
    "or None": "or 'none'",
    "weight_bits": "--weight-bits",
    "activation_bits": "--activation-bits",
    "per_channel": "--per-channel",
    "max_sweeps": "--max-sweeps",
    "scale_draw": "--scale-draw",
    "tolerance": "--tolerance",
    "activation_weight": "--activation-weight",
    "high_bias_through_padding": "--high-bias-through-padding",
    "high_bias_form": "--high-bias-form",
}


def flag_names(message: str, flags: dict[str, str] | None = None) -> str:
    """``message`` with the Python names of options replaced by their flags (``flags``
    first: ``cle evaluate`` sets both bit widths with ``--bits``)."""
    for name, flag in [*(flags or {}).items(), *_FLAGS.items()]:
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, message)
    return message


def bits_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of bits or 'none', got {text!r}"
        ) from None


INPUTS_METAVAR = "DIR|FILE.npy|FILE.npz"


def input_spec(spec: str, flag: str) -> Path:
    """``spec`` if it is a folder, a ``.npy`` or a ``.npz`` file (what backends read
    inputs from: images, one input's array, arrays by input name)."""
    path = Path(spec)
    if path.is_dir() or (path.suffix in (".npy", ".npz") and path.is_file()):
        return path
    if path.suffix in (".npy", ".npz"):
        raise UsageError(f"{path}: {flag}: no such file")
    raise UsageError(
        f"{path}: {flag} takes a folder of images, a .npy array (a model with one input) "
        "or a .npz of arrays by input name"
    )


def add_size_options(p, what: str) -> None:
    """``--dim`` and ``--input-shape``: the sizes of an input's dynamic dimensions."""
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help=f"size of the dynamic input dimension named NAME {what} (repeatable)",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="INPUT=D0,D1,...",
        help=f"every size of the input named INPUT {what}, for dimensions without a name "
        "(-1, ?) (repeatable)",
    )


def parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--dim expects NAME=SIZE with SIZE >= 1, got {item!r}")
        dims[name] = int(value)
    return dims


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    """``--input-shape INPUT=D0,D1,...`` by input name (an empty list: a scalar)."""
    shapes = {}
    for item in items:
        # Input names may hold '=' (they are any string); sizes never do.
        name, sep, value = item.rpartition("=")
        sizes = value.split(",") if value else []
        if not sep or not name or not all(d.strip().isdigit() and int(d) >= 1 for d in sizes):
            raise UsageError(
                f"--input-shape expects INPUT=D0,D1,... with every size >= 1, got {item!r}"
            )
        shapes[name] = tuple(int(d) for d in sizes)
    return shapes


def fmt_db(x: float) -> str:
    return f"{x:7.2f}" if math.isfinite(x) else f"{'inf' if x > 0 else '-inf':>7}"
