"""The torch backend: Python API (AIMET-compatible names) and the cle_core plugin."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from torch import nn

from cle_core import (
    Backend,
    BiasCorrectionRecord,
    CLEError,
    EqualizeOptions,
    EqualizeResult,
    Report,
    Translated,
    equalize,
)
from cle_core.toolkit import (
    check_draws,
    folded_only,
    keep_best,
    mean_db,
    measure_pairs,
    quality_key,
)

from ._apply import apply, make_plan, write_in_place
from ._calibrate import calibration_stats
from ._capture import Capture
from ._modules import NotInPlaceError
from ._quantsim import evaluate_torch, reference_outputs
from ._translate import capture

_BACKEND_OPTIONS = ("leaf_modules", "allow_training_mode", "allow_graph_module")


class TorchBackend(Backend):
    """Translates ``torch.nn.Module`` to the IR and writes results back.

    Options (keyword arguments of :func:`cle_core.equalize_model` that are not
    :class:`cle_core.EqualizeOptions` fields): ``input_shapes``, ``dummy_input``,
    ``leaf_modules``, ``allow_training_mode``, ``allow_graph_module``; see
    :func:`cle_torch.equalize_model`.
    """

    name = "torch"

    def to_ir(
        self,
        model: nn.Module,
        input_shapes: Any = None,
        dummy_input: Any = None,
        leaf_modules: Iterable[type | str] = (),
        allow_training_mode: bool = False,
        allow_graph_module: bool = True,
        **options: Any,
    ) -> Translated:
        _no_options(options)
        cap = capture(model, input_shapes, dummy_input, leaf_modules, allow_training_mode)
        return Translated(cap.ir, cap)

    def calibration_stats(self, translated: Translated, model, calibration):
        return calibration_stats(translated.state, calibration)

    def apply(
        self,
        model: nn.Module,
        result: EqualizeResult,
        input_shapes: Any = None,
        dummy_input: Any = None,
        leaf_modules: Iterable[type | str] = (),
        allow_training_mode: bool = False,
        allow_graph_module: bool = True,
        state: Capture | None = None,
        **options: Any,
    ) -> nn.Module:
        _no_options(options)
        if not isinstance(state, Capture) or state.model is not model:
            raise ValueError("apply() needs the state to_ir() returned for this model")
        return apply(state, result, allow_graph_module)

    def correct_biases_empirically(self, model, calibration, report):
        from ._empirical import correct_empirically

        shifts = correct_empirically(model, calibration, report.options.deployment)
        records = tuple(
            BiasCorrectionRecord(layer, shift, "calibration (empirical)", None, False)
            for layer, shift in shifts
        )
        return model, replace(report, bias_corrections=records)


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"unexpected options for the torch backend: {', '.join(sorted(options))}")


def equalize_model(
    model: nn.Module,
    input_shapes: Any = None,
    dummy_input: Any = None,
    *,
    leaf_modules: Iterable[type | str] = (),
    allow_training_mode: bool = False,
    allow_graph_module: bool = True,
    calibration: Any = None,
    verify: bool = False,
    draws: int = 0,
    **options: Any,
) -> tuple[nn.Module, Report]:
    """Cross-layer equalization of a PyTorch model: fold batch norms, scale, absorb high
    biases. The FP32 function is kept (up to float rounding). Returns
    ``(equalized model, report)``.

    The same name and leading arguments as AIMET's ``equalize_model``. The model is
    equalized **in place** when every change can be written onto its module tree, and
    then the returned model *is* ``model``. Otherwise (a bounded activation such as
    ``F.relu6`` that is a function call and needs per-channel bounds, one activation
    module called at places that need different bounds, ...) ``model`` is left untouched
    and the returned model is a rewritten ``torch.fx.GraphModule``; a warning on the
    ``cle_torch`` logger says why. AIMET's function returns None: code that ignores the
    return value keeps working whenever the work is done in place; use
    ``model, report = equalize_model(...)``, or ``allow_graph_module=False`` to get an
    error instead of a GraphModule.

    Args:
        model: a ``torch.nn.Module`` in eval mode.
        input_shapes: shape of the input (a tuple), or a list of shapes for several
            inputs, as in AIMET. A copy of the model runs on zeros of these shapes to
            measure the shape of every tensor (the model itself never runs).
        dummy_input: a tensor or a tuple of tensors; an alternative to ``input_shapes``
            (token ids for a language model). Needed when a Linear reads a graph input
            (an MLP) and for transformers: transposes, reshapes and Linears on tokens
            ``(B, T, C)`` need the shapes.
        leaf_modules: module types or qualified names not to trace into; each is kept as
            is and blocks equalization around it (for code that cannot be traced).
        allow_training_mode: equalize a model in training mode as if it were in eval
            mode (the training flags are kept). Otherwise :class:`TrainingModeError`.
        allow_graph_module: if False, raise :class:`NotInPlaceError` (before changing
            anything) where a GraphModule would be returned.
        calibration: optional inputs on which the per-channel statistics of the noise
            objective are measured instead of estimated from the batch norms; a few
            dozen suffice. A tensor or array ``(N, ...)``, or an iterable of batches (a
            list, a generator, a ``DataLoader``), each a tensor or array, or a tuple or
            list of them for a model with several inputs. Float data is cast to the
            model's float type; integer and bool data is passed as it is. The model is
            run on a copy in eval mode (its parameters shared), whatever its mode, and is
            never changed. Paths, dicts, ragged or nested lists, strings, records,
            objects, complex numbers and NaN / Inf (:class:`NonFiniteError`, with the
            first index) are refused.
        verify: with ``calibration`` (one tensor or array ``(N, ...)``), quantize the
            original (batch norms folded) and the equalized model with the deployment the
            scales were chosen for (:func:`evaluate_torch`; each half of the inputs
            calibrating while the other is measured, the mean of the two figures) and
            return the better one;
            ``report.verification`` has both figures. ``model`` is then never modified:
            both are computed on copies.
        draws: with ``verify``, also measure this many redrawn equalizations
            (``scale_draw`` 1, 2 ...: each channel's scale times ``exp(0.02 z)``, all
            exact) and return the best measured of all (``docs/core.rst``, "Verify").
        **options: :class:`cle_core.EqualizeOptions` fields (``max_sweeps``,
            ``per_channel``, ``deployment``, ``high_bias`` ...).

    Raises:
        UntraceableModelError: torch.fx cannot trace the forward (the message says where
            and what to try).
        TrainingModeError: the model is in training mode (see ``allow_training_mode``).
        NotInPlaceError: ``allow_graph_module=False`` and the result needs a GraphModule.
        CLEError: any other bad input; the model is then unchanged.
    """
    cle_options, rest = EqualizeOptions.from_kwargs(**options)
    _no_options(rest)
    backend_options = dict(
        input_shapes=input_shapes,
        dummy_input=dummy_input,
        leaf_modules=leaf_modules,
        allow_training_mode=allow_training_mode,
        allow_graph_module=allow_graph_module,
    )
    draws = check_draws(draws, verify, cle_options)
    if not verify:
        return TorchBackend().run(model, cle_options, calibration, **backend_options)
    if calibration is None:
        raise CLEError("verify needs calibration inputs (calibration=) to measure on")
    deployment = cle_options.deployment
    pairs, count = measure_pairs(calibration, deployment)
    key = quality_key(deployment)
    backend = TorchBackend()

    def equalized(k: int):
        drawn = replace(cle_options, scale_draw=k)
        return backend.run(copy.deepcopy(model), drawn, calibration, **backend_options)

    folded, _ = backend.run(copy.deepcopy(model), folded_only(cle_options), **backend_options)
    # once the model is known to translate; one FP32 run per half serves every candidate
    references = [reference_outputs(model, measure_on) for _, measure_on in pairs]

    def measure(candidate: nn.Module) -> float:
        figures = [
            evaluate_torch(
                model,
                candidate,
                measure_on,
                deployment=deployment,
                calibration=calibrate_on,
                reference=reference,
                deployed_only=True,
            )[key]
            for (calibrate_on, measure_on), reference in zip(pairs, references, strict=True)
        ]
        return mean_db(figures)

    original_db = measure(folded)
    with backend.statistics_reused():  # copies of one model, one set of inputs
        return keep_best(folded, original_db, equalized, measure, draws, deployment, count)


def fold_all_batch_norms(
    model: nn.Module,
    input_shapes: Any = None,
    dummy_input: Any = None,
    *,
    leaf_modules: Iterable[type | str] = (),
    allow_training_mode: bool = False,
) -> list[tuple[nn.Module, nn.Module]]:
    """Fold every batch norm that can be folded exactly into its Conv / ConvTranspose /
    Linear, in place (AIMET's name and arguments). Folded BNs become ``nn.Identity``; a
    layer without a bias gets one. Returns the folded ``(layer, batch norm)`` module
    pairs (a BN folded into the inputs of several layers gives one pair per layer).

    Raises :class:`NotInPlaceError`, changing nothing, when a fold cannot be written
    onto the module tree (a BN module called at several places of which only some can
    be folded, or a layer whose ``forward`` passes no bias); ``equalize_model(model,
    scale=False, high_bias=False)`` then returns a rewritten GraphModule instead.
    """
    cap = capture(model, input_shapes, dummy_input, leaf_modules, allow_training_mode)
    result = equalize(cap.ir, EqualizeOptions(scale=False, high_bias=False))
    plan = make_plan(cap, result)
    if plan.reasons:
        raise NotInPlaceError(
            f"cannot fold the batch norms of {type(model).__name__} in place: "
            f"{'; '.join(plan.reasons)}. Nothing was changed; "
            "equalize_model(model, scale=False, high_bias=False) returns a rewritten "
            "torch.fx.GraphModule instead."
        )
    pairs = []
    for fold in result.report.folds:
        bn = model.get_submodule(cap.sites[cap.ir_names[fold.bn]].module)
        for layer in fold.layers:
            site = cap.sites[cap.ir_names[layer]]
            pairs.append((model.get_submodule(site.module or site.owner or ""), bn))
    write_in_place(cap, plan)
    return pairs
