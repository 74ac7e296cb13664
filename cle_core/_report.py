"""Options, the report, and the result of :func:`cle_core.equalize`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from ._deployment import Deployment
from ._errors import CLEError
from ._objectives import get_objective, objective_trait

NOISE_TOLERANCE = 0.003
_DEPLOYMENT_FIELDS = (
    "weight_bits",
    "per_channel",
    "weight_symmetric",
    "activation_bits",
    "activation_symmetric",
    "quantizer",
)


@dataclass(frozen=True)
class EqualizeOptions:
    """What :func:`cle_core.equalize` does. The defaults are exact: the FP32 function
    is unchanged up to float rounding, whatever the objective.

    Attributes:
        fold_bn: fold batch norms into adjacent layers first.
        scale: run cross-layer scaling.
        objective: how scales are chosen, by the name of a registered objective
            (:func:`cle_core.objective_names`). ``"noise"`` (the default) minimizes the
            estimated quantization noise at the outputs for the deployment below
            (``docs/core.rst``); ``"balance"`` is the paper's and AIMET's rule, equal
            per-channel weight ranges, iterated to convergence.
        weight_bits, per_channel, weight_symmetric, activation_bits,
        activation_symmetric, quantizer: the deployment the scales are chosen for
            (:class:`cle_core.Deployment`; the defaults are onnxruntime
            ``quantize_static``'s: 8-bit symmetric weights per tensor, 8-bit asymmetric
            activations; ``activation_bits=None`` for weights only). ``deployment=``
            sets them all from one :class:`~cle_core.Deployment`.
        max_sweeps: the most sweeps over all regions.
        tolerance: when to stop sweeping. Noise objective: once a sweep lowers the
            estimate by less than this fraction (default 0.003: stopping at 0.05
            after 3 sweeps left 1.6 dB of W8 on a MobileNetV2-style network, see
            docs/benchmarks.rst). Balance: once no scale changes by more than
            this, relatively (default 1e-4).
        high_bias: run high-bias absorption after scaling.
        high_bias_form: ``"exact"`` moves the shift into the activation's lower bound
            (exact); ``"classic"`` keeps the lower bound at 0, as in the paper and AIMET
            (inexact where a pre-activation falls below the shift; the report gives the
            expected error).
        high_bias_through_padding: also absorb into layers that zero-pad the activation
            (inexact at the borders). Off by default.
        high_bias_sigmas: the shift is ``max(0, beta - sigmas * |gamma|)``.
        bias_correction: after scaling and high-bias absorption, subtract from each
            layer's bias the mean shift ``E[(Q(W) - W) x]`` that rounding its weights to
            the deployment's grid adds to its output (Nagel et al. 2019, section 4.2;
            ``docs/core.rst``). ``True`` or ``"analytic"``: from the input means (the
            folded batch norms, or calibration statistics); ``"empirical"``: measured
            layer by layer on calibration data with the layers before already rounded
            (a backend's: ONNX and PyTorch). Changes the FP32 function by design, by
            about the weight rounding noise (the report gives it per layer): off by
            default.
        activation_weight: balance objective only (deprecated: the noise objective
            weighs activations by what they cost at ``activation_bits``). The weight of
            estimated activation ranges (a clip bound, or ``|beta| + 3|gamma|`` of the
            folded BN) as extra sources of their region; 0 is the pure balance.
        scale_draw: 0 (the default) keeps the objective's scales. ``k > 0`` multiplies
            each channel's scale by ``exp(0.02 z)``, ``z`` standard normal drawn with
            seed ``k``: another exact equalization, estimated within about 0.1 dB of the
            same noise, with other rounding errors. One quantized figure is one draw of
            the rounding, and the draws spread by several dB: ``verify`` with ``draws``
            measures a few and keeps the best (``docs/core.rst``, "Verify").
    """

    fold_bn: bool = True
    scale: bool = True
    objective: str = "noise"
    weight_bits: int = 8
    activation_bits: int | None = 8
    per_channel: bool = False
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    quantizer: str = "onnxruntime"
    max_sweeps: int = 200
    tolerance: float | None = None
    high_bias: bool = True
    high_bias_form: Literal["exact", "classic"] = "exact"
    high_bias_through_padding: bool = False
    high_bias_sigmas: float = 3.0
    activation_weight: float = 0.0
    bias_correction: bool | str = False
    scale_draw: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.objective, str):
            raise CLEError("objective must be the name of a registered objective")
        get_objective(self.objective)
        self.deployment  # noqa: B018  (checks the deployment's fields)
        if self.max_sweeps < 1:
            raise CLEError("max_sweeps must be at least 1")
        if self.tolerance is not None and not (self.tolerance > 0):
            raise CLEError("tolerance must be positive")
        if self.activation_weight and not objective_trait(self.objective, "uses_activation_weight"):
            raise CLEError(
                "activation_weight applies to objective='balance'; the noise objective "
                "weighs activations by activation_bits (set activation_bits=None for a "
                f"weights-only deployment); objective {self.objective!r} does not read it"
            )
        if self.high_bias_form not in ("exact", "classic"):
            raise CLEError("high_bias_form must be 'exact' or 'classic'")
        if not (self.high_bias_sigmas >= 0):
            raise CLEError("high_bias_sigmas must be >= 0")
        if not (self.activation_weight >= 0) or self.activation_weight == float("inf"):
            raise CLEError("activation_weight must be finite and >= 0")
        if isinstance(self.scale_draw, bool) or not isinstance(self.scale_draw, (int, np.integer)):
            raise CLEError(f"scale_draw must be an integer >= 0, not {self.scale_draw!r}")
        if self.scale_draw < 0:
            raise CLEError(f"scale_draw must be >= 0, not {self.scale_draw}")
        if self.bias_correction not in (False, True, "analytic", "empirical"):
            raise CLEError(
                "bias_correction must be False, True (= 'analytic') or 'empirical', "
                f"not {self.bias_correction!r}"
            )

    @property
    def bias_correction_form(self) -> str | None:
        """``"analytic"``, ``"empirical"`` or None (no bias correction)."""
        if self.bias_correction is True:
            return "analytic"
        return self.bias_correction or None

    @property
    def deployment(self) -> Deployment:
        """The deployment the scales are chosen for."""
        return Deployment(**{name: getattr(self, name) for name in _DEPLOYMENT_FIELDS})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> tuple[EqualizeOptions, dict[str, Any]]:
        """Split keyword arguments into options and the rest (for a backend)."""
        names = {f.name for f in fields(cls)}
        deployment = kwargs.pop("deployment", None)
        if deployment is not None:
            if not isinstance(deployment, Deployment):
                raise CLEError("deployment must be a cle_core.Deployment")
            clash = sorted(set(_DEPLOYMENT_FIELDS) & set(kwargs))
            if clash:
                raise CLEError(f"give deployment= or {', '.join(clash)}, not both")
            kwargs.update({name: getattr(deployment, name) for name in _DEPLOYMENT_FIELDS})
        mine = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**mine), rest


@dataclass(frozen=True, eq=False)
class PassResult:
    """What one pass did: its records (:class:`FoldRecord`, :class:`RegionRecord`,
    :class:`HighBiasRecord`), what it left alone and why, the names of the nodes it
    changed, and the nodes it removed (folded batch norms). ``details`` carries what is
    particular to a pass (the scaling pass: its :class:`~cle_core._objectives.ScaleOutcome`)."""

    records: tuple = ()
    skips: tuple[SkipRecord, ...] = ()
    changed: frozenset[str] = frozenset()
    removed: tuple[str, ...] = ()
    details: Any = None


@dataclass(frozen=True)
class FoldRecord:
    """A batch norm folded into ``layers``, on their output side or their input side."""

    bn: str
    layers: tuple[str, ...]
    side: Literal["output", "input"]


@dataclass(frozen=True)
class SkipRecord:
    """A candidate that was not transformed, and why."""

    stage: Literal["translate", "fold", "scale", "high_bias", "bias_correction"]
    candidate: str
    reason: str


@dataclass(frozen=True, eq=False)
class RegionRecord:
    """One equalization region: sources' output channels are divided by ``scales``,
    sinks' input channels multiplied. ``kind`` is ``pair``, ``fan-out``, ``residual`` or
    ``concat``; in transformers also ``norm``, ``attention``, ``gated`` and ``qk`` (its
    source is K's projection, its sink q's, whose output rows are multiplied by the
    scale of the K channel each meets in ``Q K^T``). With the noise objective,
    ``noise_before`` and ``noise_after`` are the estimated output noise (a fraction of
    the output power) of every term that touches the region: its sources' and sinks'
    weight grids and its quantized activations, at scales 1 and at the chosen scales.
    ``tied``: the pairs of channels that share one scale (those a rotary embedding
    rotates together, in a ``qk`` region), 0 for none."""

    id: int
    kind: str
    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    through: tuple[str, ...]
    channels: int
    scales: np.ndarray = field(repr=False)
    noise_before: float | None = None
    noise_after: float | None = None
    tied: int = 0


@dataclass(frozen=True, eq=False)
class HighBiasRecord:
    """High-bias absorption out of ``layer`` through ``activation`` into ``into``.

    ``exact`` is False for the classic form and for placements across zero padding;
    ``expected_error`` is then the mean expected absolute error per channel at the
    activation output under the BN statistics (classic form), and ``relative_error`` that
    error over the mean activation. They are None where no estimate exists."""

    layer: str
    activation: str
    into: tuple[str, ...]
    form: str
    exact: bool
    inexact_because: tuple[str, ...]
    absorbed: np.ndarray = field(repr=False)
    expected_error: float | None = None
    relative_error: float | None = None


@dataclass(frozen=True, eq=False)
class BiasCorrectionRecord:
    """Bias correction of ``layer``: ``shift`` (per output channel) was subtracted from
    its bias, the mean change that rounding its weights to the deployment's grid brings
    to its output. ``input_mean`` says where ``E[x]`` came from (``"batch norms"``:
    estimated from the folded batch norms or propagated through the layers;
    ``"calibration"``: measured). ``fp32_sqnr``: the layer's estimated FP32 output
    signal over the shift, in dB (the FP32 change the correction makes, by design);
    None where the output's statistics are unknown. ``padding``: whether the shift
    weighs the taps that read zero padding less (the layer pads and its input size is
    known)."""

    layer: str
    shift: np.ndarray = field(repr=False)
    input_mean: str
    fp32_sqnr: float | None
    padding: bool


@dataclass(frozen=True, eq=False)
class LayerRecord:
    """Per-output-channel weight ranges and estimated per-tensor INT8 weight SQNR (dB),
    before CLE (after BN folding) and after."""

    name: str
    ranges_before: np.ndarray = field(repr=False)
    ranges_after: np.ndarray = field(repr=False)
    sqnr_before: float
    sqnr_after: float


@dataclass(frozen=True, eq=False)
class NoiseEstimate:
    """What the noise objective estimated: the output noise-to-signal ratio of the
    ``deployment`` (described in words) before CLE and after, and after each sweep
    (``history``). ``positions_known`` is False when a spatial size had to be assumed."""

    before: float
    after: float
    history: tuple[float, ...]
    positions_known: bool = True
    deployment: str = ""

    @property
    def sqnr_before(self) -> float:
        """Estimated output SQNR before CLE, in dB."""
        return _db(self.before)

    @property
    def sqnr_after(self) -> float:
        """Estimated output SQNR after CLE, in dB."""
        return _db(self.after)


def _db(nsr: float) -> float:
    if nsr <= 0:
        return math.inf
    return -10.0 * math.log10(nsr) if math.isfinite(nsr) else -math.inf


@dataclass(frozen=True)
class Verification:
    """``verify``: the deployment measured on calibration inputs, the original (batch
    norms folded) against the equalized model, and which of the two was kept. With
    ``draws``, also the figures of the redrawn equalizations (``scale_draw`` 1, 2 ...)
    and the draw kept (0: the objective's own scales), and the margin a redrawn one
    needed above what ``verify`` alone keeps."""

    deployment: str
    inputs: int  # the inputs the figures are measured on (the rest calibrated the grids)
    original_db: float
    equalized_db: float
    kept: Literal["equalized", "original"]
    drawn: tuple[float, ...] = ()
    draw: int = 0
    margin: float = 0.0

    def summary(self) -> str:
        text = (
            f"verified ({self.deployment}, {self.inputs} inputs): original "
            f"{self.original_db:.2f} dB, equalized {self.equalized_db:.2f} dB"
        )
        if self.drawn:
            text += f", {len(self.drawn)} redrawn {min(self.drawn):.2f} to {max(self.drawn):.2f} dB"
            if self.margin:
                text += f" (one is kept if over {self.margin:g} dB better)"
        if self.kept == "equalized" and self.draw:
            figure = self.drawn[self.draw - 1]
            return f"{text}; kept draw {self.draw} ({figure:.2f} dB)"
        return f"{text}; kept the {self.kept}"


@dataclass(frozen=True, eq=False)
class Report:
    """Everything :func:`cle_core.equalize` did and did not do."""

    options: EqualizeOptions
    folds: tuple[FoldRecord, ...]
    regions: tuple[RegionRecord, ...]
    triples: tuple[tuple[str, str, str], ...]
    high_bias: tuple[HighBiasRecord, ...]
    skipped: tuple[SkipRecord, ...]
    layers: tuple[LayerRecord, ...]
    sweeps: int
    converged: bool
    max_change: float
    noise: NoiseEstimate | None = None
    verification: Verification | None = None
    bias_corrections: tuple[BiasCorrectionRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays become lists, non-finite floats strings)."""
        return _jsonable(asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def mean_sqnr(self) -> tuple[float, float]:
        """Mean estimated INT8 weight SQNR over the layers, before and after."""
        fin = [
            (r.sqnr_before, r.sqnr_after)
            for r in self.layers
            if math.isfinite(r.sqnr_before) and math.isfinite(r.sqnr_after)
        ]
        if not fin:
            return math.nan, math.nan
        return (sum(b for b, _ in fin) / len(fin), sum(a for _, a in fin) / len(fin))

    def summary(self, verbose: bool = False) -> str:
        """What was done, in a few lines for a terminal (what ``cle equalize`` prints):
        counts, the estimate, and the skip reasons grouped with their counts.
        ``verbose=True`` lists every skipped candidate and every layer's estimated
        INT8 weight SQNR instead (``cle equalize -v``)."""
        return _summary(self, verbose)

    def skip_reasons(self, top: int = 5) -> list[str]:
        """The skip reasons grouped by pattern (names and numbers taken out), with their
        counts, most frequent first: ``"12 x [scale] ..."`` (a reason met once is shown
        whole), at most ``top`` lines and one that says how many were left out."""
        groups: dict[str, list[SkipRecord]] = {}
        for s in self.skipped:
            pattern = re.sub(r"'[^']*'", "'...'", s.reason)
            pattern = re.sub(r"\b\d+\b", "N", pattern)
            groups.setdefault(f"[{s.stage}] {pattern}", []).append(s)
        ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        # A line that says "1 more" takes the place of the line it hides.
        shown = ranked if len(ranked) <= top + 1 else ranked[:top]
        lines = [
            f"{len(records)} x {key}"
            if len(records) > 1
            else f"1 x [{records[0].stage}] {records[0].candidate}: {records[0].reason}"
            for key, records in shown
        ]
        if len(ranked) > len(shown):
            lines.append(
                f"... and {len(ranked) - len(shown)} more kinds (-v lists every candidate)"
            )
        return lines


# Below 0 dB the estimated noise is larger than the signal: the estimate could not follow
# the model to its outputs (a detector's box decoding, top-k and score thresholds gave
# -88 dB; random weights that shrink the signal do the same). It still ranks scales, but
# the figure says nothing about the quality a user gets, which only a measurement gives.
IMPLAUSIBLE_DB = 0.0


def estimate_text(noise: NoiseEstimate, short: str) -> str:
    """The noise objective's estimate as the summary words it: ``short`` names the
    deployment (``W8A8``)."""
    before, after = noise.sqnr_before, noise.sqnr_after
    figures = f"{_fmt_db(before)} dB -> {_fmt_db(after)} dB"
    if math.isnan(after) or after < IMPLAUSIBLE_DB:
        return (
            f"est. output SQNR ({short}) not meaningful for this model ({figures}: below "
            "0 dB the estimate only ranks scales, it does not follow this model to its "
            "outputs; cle evaluate measures them)"
        )
    return f"est. output SQNR ({short}) {figures}"


def _fmt_db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _stop_reason(report: Report) -> str:
    history = report.noise.history if report.noise is not None else []
    if len(history) >= 2 and history[-2] > 0:
        gain = 100 * (history[-2] - history[-1]) / history[-2]
        state = "converged" if report.converged else "stopped at max_sweeps"
        if gain < 0.05:
            return f"{state}: the last sweep changed nothing"
        return f"{state}: the last sweep lowered the estimate by {gain:.1f} %"
    state = "converged" if report.converged else "not converged"
    return f"{state}, max change {report.max_change:.1e}"


def _summary(report: Report, verbose: bool) -> str:
    objective = report.options.objective
    fallback = objective_trait(objective, "fallback")
    if fallback and report.noise is None and report.regions:
        objective = f"{fallback} (the {objective} estimate is not finite here, see skipped)"
    elif report.noise is not None and report.regions:
        objective += ": " + estimate_text(report.noise, report.options.deployment.short())
    kinds = _counts(r.kind for r in report.regions)
    scaled = sum(bool(np.any(r.scales != 1)) for r in report.regions)
    inexact = sum(not r.exact for r in report.high_bias)
    lines = [
        f"batch norms folded: {len(report.folds)}",
        f"regions equalized:  {scaled}"
        # Regions whose scales all stayed 1 (a gain under 1 dB is not applied) are found,
        # not equalized: "19" there read as if the model had changed.
        + (f" of {len(report.regions)} found" if scaled < len(report.regions) else "")
        + (f" ({', '.join(f'{n} {k}' for k, n in kinds)})" if kinds else ""),
        f"objective:          {objective}",
    ]
    # What the search as a whole decided (no region scaled, a fallback), said where the
    # figures are: among the per-candidate reasons it is one of many kinds, often hidden.
    search = f"{report.options.objective} objective"
    lines += [f"{'':20}{s.reason}" for s in report.skipped if s.candidate == search]
    if report.options.scale_draw and report.regions:
        lines.append(
            f"{'':20}scales redrawn (scale_draw={report.options.scale_draw}): each the "
            "objective's times exp(0.02 z), an exact equalization; the estimate is of the "
            "objective's own"
        )
    lines.append(f"deployment:         {report.options.deployment.describe()}")
    if report.verification is not None:
        lines.append(
            f"verified:           {report.verification.summary().removeprefix('verified ')}"
        )
    lines += [
        f"sweeps:             {report.sweeps} ({_stop_reason(report)})",
        f"high-bias absorbed: {len(report.high_bias)} layers"
        + (f" ({inexact} inexact, see the report)" if inexact else ""),
    ]
    if report.options.bias_correction_form:
        skipped = [s for s in report.skipped if s.stage == "bias_correction"]
        text = bias_correction_text(report.bias_corrections, skipped)
        lines.append(f"bias correction:    {text}")
    before, after = report.mean_sqnr()
    if not report.layers:
        lines.append("weight SQNR (est.): no layer was translated")
    elif not verbose:
        lines.append(
            f"weight SQNR (est.): mean {_fmt_db(before)} dB -> {_fmt_db(after)} dB over "
            f"{len(report.layers)} layers (INT8 per tensor; -v lists each layer)"
        )
    lines.append(f"skipped:            {len(report.skipped)}")
    if verbose:
        lines += [f"  [{s.stage}] {s.candidate}: {s.reason}" for s in report.skipped]
    else:
        lines += [f"  {line}" for line in report.skip_reasons(top=3)]
    if verbose and report.layers:
        lines.append("estimated INT8 weight SQNR per layer (dB):")
        width = max([len(r.name) for r in report.layers] + [5])
        lines.append(f"  {'layer':<{width}}  {'before':>7}  {'after':>7}")
        for r in report.layers:
            lines.append(f"  {r.name:<{width}}  {_col(r.sqnr_before)}  {_col(r.sqnr_after)}")
        lines.append(f"  {'mean':<{width}}  {_col(before)}  {_col(after)}")
    return "\n".join(lines)


def bias_correction_text(records, skipped=()) -> str:
    """One line on the bias corrections: how many layers, from what, and the FP32
    change they make (the worst layer's estimated SQNR of its output against it); how
    many layers were skipped and the most frequent reason (a skipped layer has a
    record in ``skipped``)."""
    text = f"{len(records)} layers"
    if records:
        text += f" (input means from {', '.join(sorted({r.input_mean for r in records}))})"
        known = [r.fp32_sqnr for r in records if r.fp32_sqnr is not None]
        text += "; FP32 changes by design"
        if known:
            text += (
                f", the layer most changed by {_fmt_db(min(known))} dB (output SQNR "
                "against the shift)"
            )
    if skipped:
        reason, count = max(_counts(s.reason for s in skipped), key=lambda rc: rc[1])
        text += f"; {len(skipped)} skipped ({count} x {reason})"
        if reason == "the mean of its input is unknown":
            text += ": --calibration measures it"
    return text


def _col(x: float) -> str:
    return f"{_fmt_db(x):>7}"


def _counts(items):
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return sorted(out.items())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


@dataclass(frozen=True, eq=False)
class EqualizeResult:
    """The equalized graph (the same object that was passed in), the report, and what
    a backend must write back: ``changed`` nodes (params, op or attrs changed) and
    ``removed`` nodes (folded batch norms, whose consumers now read their input)."""

    graph: Any
    report: Report
    changed: tuple[str, ...]
    removed: tuple[str, ...]
