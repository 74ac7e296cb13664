"""``verify``: measure the original and the equalized model in the deployment the user
names, on calibration inputs, and keep the better one.

The estimate that chooses the scales is a model of the quantizer, not the quantizer; with
a few inputs the real one can be asked. Half of them calibrate the quantizer's grids, the
other half measure the output SQNR against the FP32 original, so that inputs the grids
did not see (and clip) count as they do in deployment. The backends run the models; this
module holds what they share.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ._deployment import Deployment
from ._errors import CLEError
from ._report import EqualizeOptions, Report, Verification

logger = logging.getLogger("cle_core")

MIN_SPLIT = 8
"""With fewer inputs, the same inputs calibrate and measure."""


def split_inputs(inputs: Any) -> tuple[Any, Any, int]:
    """``(calibrate on, measure on, number measured on)``: the first half of ``inputs``
    (an array or tensor ``(N, ...)``, or a mapping of them by input name) and the
    second half; all of them twice below :data:`MIN_SPLIT`."""
    if isinstance(inputs, Mapping):
        arrays = dict(inputs)
        n = min(len(a) for a in arrays.values()) if arrays else 0
        if n < MIN_SPLIT:
            return arrays, arrays, n
        half = n // 2
        return (
            {k: a[:half] for k, a in arrays.items()},
            {k: a[half:] for k, a in arrays.items()},
            n - half,
        )
    if not hasattr(inputs, "shape") or len(inputs.shape) == 0:
        raise CLEError(
            "verify needs the calibration inputs as one array or tensor (N, ...), or a "
            f"dict of them by input name; got {type(inputs).__name__}"
        )
    n = int(inputs.shape[0])
    if n < MIN_SPLIT:
        return inputs, inputs, n
    half = n // 2
    return inputs[:half], inputs[half:], n - half


def quality_key(deployment: Deployment) -> str:
    """The key of the deployment's figure in the evaluation functions' results."""
    w = deployment.weight_bits
    return f"w{w}_sqnr" if deployment.weights_only else f"w{w}a{deployment.activation_bits}_sqnr"


def verdict(
    report: Report, deployment: Deployment, measured: int, original_db: float, equalized_db: float
) -> tuple[Report, bool]:
    """The report with its :class:`Verification`, and whether the equalized model is
    kept (it is unless the original measured better; a warning says so)."""
    keep = bool(equalized_db >= original_db or np.isnan(original_db))
    v = Verification(
        deployment.describe(),
        measured,
        float(original_db),
        float(equalized_db),
        "equalized" if keep else "original",
    )
    if not keep:
        logger.warning(
            "verify: the original (batch norms folded) measures %.2f dB, the equalized "
            "model %.2f dB (%s): kept the original",
            original_db,
            equalized_db,
            deployment.describe(),
        )
    return replace(report, verification=v), keep


def folded_only(options: EqualizeOptions) -> EqualizeOptions:
    """``options`` doing nothing but fold the batch norms: the original as a deployment
    quantizes it, which ``verify`` measures the equalized model against (no scaling, no
    high-bias absorption, no bias correction)."""
    return replace(options, scale=False, high_bias=False, bias_correction=False)
