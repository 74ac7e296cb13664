"""Simulated quantization of PyTorch models, measured against the FP32 model.

Weights: every ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear`` (and
subclasses, such as EfficientNet's ``Conv2dStaticSamePadding``) gets its weight
fake-quantized in a deep copy of the model, and so does ``nn.MultiheadAttention``'s
packed ``in_proj_weight``, as one tensor (the exporters and PT2E quantize it so; its
input is not). Activations: forward pre-hooks on the same
modules fake-quantize their input 0 with one grid per module, calibrated by min/max in a
first pass. The grids are those of :mod:`cle_core.quality`, computed in float32 (the
ONNX weights-only figures use the same ones; its W+A figures come from onnxruntime's
quantizer, which quantizes more tensors than layer inputs). Pure measurement: nothing
here knows about CLE.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from cle_core import Deployment
from cle_core.quality import compare_outputs, natural_images, quantization_grid, quantize_array
from cle_core.toolkit import deployment_of

__all__ = ["evaluate_torch"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = _CONV + _CONV_TRANSPOSE + (nn.Linear,)


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            yield name, module


def _weight_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, _CONV_TRANSPOSE) else 0


def _prepared_copy(model: nn.Module) -> nn.Module:
    """A float32 deep copy in eval mode: the caller's model keeps its dtype and mode."""
    return copy.deepcopy(model).float().eval()


def _quantize_weights(model: nn.Module, bits: int, per_channel: bool, symmetric: bool) -> None:
    seen: set[int] = set()
    for _, module in _layers(model):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))  # a weight shared by several layers is quantized once
        axis = _weight_axis(module) if per_channel else None
        q = quantize_array(weight.detach().cpu().numpy(), bits, symmetric, axis)
        with torch.no_grad():
            weight.copy_(torch.from_numpy(q).to(weight.device))
    for module in model.modules():
        weight = getattr(module, "in_proj_weight", None)
        if not isinstance(module, nn.MultiheadAttention) or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        q = quantize_array(
            weight.detach().cpu().numpy(), bits, symmetric, 0 if per_channel else None
        )
        with torch.no_grad():
            weight.copy_(torch.from_numpy(q).to(weight.device))


def _fake_quant(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool):
    scale, zero_point, qmin, qmax = quantization_grid(lo, hi, bits, symmetric)
    s = torch.tensor(np.float32(scale), device=x.device)
    z = float(zero_point)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return (q - z) * s


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor")


def _run(model: nn.Module, inputs: torch.Tensor, batch: int) -> np.ndarray:
    device = _device(model)
    parts = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            out = _first_tensor(model(inputs[start : start + batch].to(device)))
            parts.append(out.detach().float().cpu().numpy())
    return np.concatenate(parts, axis=0)


def reference_outputs(model: nn.Module, inputs, batch: int = 16) -> np.ndarray:
    """``model``'s first output on ``inputs`` as :func:`evaluate_torch` computes its
    reference (a float32 copy in eval mode, in batches of ``batch``)."""
    return _run(_prepared_copy(model), _float_tensor(inputs), batch)


def _float_tensor(inputs) -> torch.Tensor:
    """An array or tensor as a detached float32 tensor (a NumPy array copied: torch
    warns on read-only ones)."""
    x = torch.as_tensor(np.array(inputs) if isinstance(inputs, np.ndarray) else inputs)
    return x.detach().float()


def _with_pre_hooks(model: nn.Module, make_hook: Callable[[str], Callable]) -> list:
    return [module.register_forward_pre_hook(make_hook(name)) for name, module in _layers(model)]


def _activation_quantized_run(
    model: nn.Module,
    inputs: torch.Tensor,
    bits: int,
    symmetric: bool,
    batch: int,
    calibration: torch.Tensor | None = None,
) -> np.ndarray:
    ranges: dict[str, list[float]] = {}

    def recorder(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].numel():
                x = args[0].detach()
                lo, hi = float(x.min()), float(x.max())
                r = ranges.setdefault(name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)

        return hook

    def quantizer(name):
        def hook(module, args):
            if name in ranges and args and isinstance(args[0], torch.Tensor):
                lo, hi = ranges[name]
                return (_fake_quant(args[0], lo, hi, bits, symmetric), *args[1:])
            return None

        return hook

    handles = _with_pre_hooks(model, recorder)
    try:
        _run(model, inputs if calibration is None else calibration, batch)
    finally:
        for h in handles:
            h.remove()
    handles = _with_pre_hooks(model, quantizer)
    try:
        return _run(model, inputs, batch)
    finally:
        for h in handles:
            h.remove()


def evaluate_torch(
    fp32_model: nn.Module,
    candidate_model: nn.Module | None = None,
    inputs: np.ndarray | torch.Tensor | None = None,
    bits: int | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    activations: bool | None = None,
    batch: int = 16,
    *,
    deployment: Deployment | None = None,
    calibration: np.ndarray | torch.Tensor | None = None,
    reference: np.ndarray | None = None,
    deployed_only: bool = False,
) -> dict[str, float]:
    """Measure what simulated quantization does to the logits, against the FP32 model.

    The candidate (``fp32_model`` itself when ``candidate_model`` is None) is copied and
    its Conv/ConvTranspose/Linear weights are fake-quantized with min/max grids (per
    tensor, or per output channel: axis 0, 1 for ConvTranspose), as ``deployment``
    (default: :class:`cle_core.Deployment`, symmetric weights per tensor, asymmetric
    activations) or the older keywords say (see :func:`cle_core.toolkit.deployment_of`).
    With activations quantized, input 0 of each such module is also fake-quantized per
    tensor by a forward pre-hook, with ranges calibrated in a first pass over
    ``calibration`` (default: ``inputs``) on the weight-quantized copy. Everything runs on float32
    deep copies in eval mode under ``torch.no_grad()``, in batches of ``batch``; the
    models passed in are not modified. ``inputs`` default to ``natural_images(224)``.
    ``reference``: ``fp32_model``'s first output on ``inputs``, from
    :func:`reference_outputs`, so that measuring several candidates against one model
    runs it once (as ``verify`` does). ``deployed_only``: the deployment's own figure
    alone (``wNaN_*``, or ``wN_*`` for weights only); the candidate is not run in FP32,
    nor with its weights alone where activations are quantized (``verify`` reads that one).

    Returns, for ``bits = N``, the first output compared with the FP32 ``fp32_model``'s:

    - ``fp32_sqnr``, ``fp32_top1``: candidate in FP32 (inf and 1.0 without a candidate);
    - ``wN_sqnr``, ``wN_top1``: SQNR in dB and top-1 agreement with N-bit weights;
    - ``wNaN_sqnr``, ``wNaN_top1``: with N-bit activations too (only when ``activations``).
    """
    dep = deployment_of(deployment, bits, per_channel, symmetric, activations)
    bits, per_channel, activations = dep.weight_bits, dep.per_channel, not dep.weights_only
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    if inputs is None:
        inputs = natural_images(224)
    x = _float_tensor(inputs)

    if reference is None:
        reference = reference_outputs(fp32_model, x, batch)
    elif len(reference) != len(x):
        raise ValueError(f"reference has {len(reference)} outputs for {len(x)} inputs")
    source = fp32_model if candidate_model is None else candidate_model
    outputs = {}
    if not deployed_only:
        outputs["fp32"] = (
            reference if candidate_model is None else _run(_prepared_copy(source), x, batch)
        )
    wq = _prepared_copy(source)
    _quantize_weights(wq, bits, per_channel, dep.weight_symmetric)
    if not (deployed_only and activations):
        outputs[f"w{bits}"] = _run(wq, x, batch)
    if activations:
        a_bits = dep.activation_bits
        calib = None if calibration is None else _float_tensor(calibration)
        outputs[f"w{bits}a{bits}"] = _activation_quantized_run(
            wq, x, a_bits, dep.activation_symmetric, batch, calib
        )
    return compare_outputs(reference, outputs)
