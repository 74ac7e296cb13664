"""Empirical bias correction for PyTorch models (``bias_correction="empirical"``), as
``cle_onnx._empirical`` does it for ONNX: layer by layer in the order the forward pass
calls them, with the layers before already on the deployment's grid and corrected, the
mean of each layer's output over the calibration inputs is measured with its weights
rounded and subtracted from the float model's; the difference leaves the layer's bias.
One pass over the calibration inputs per layer. The weights go back to float at the
end (the deployed quantizer rounds them itself); a layer without a bias gets one."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from cle_core import CLEError, Deployment
from cle_core.quality import weights_on_grid
from cle_core.toolkit import StatsAccumulator

from ._calibrate import _batches, _float_dtype

_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def _out_axis(module: nn.Module) -> int:
    """The axis of the weight that holds the output channels (1 for a ConvTranspose)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def _run(model: nn.Module, batches: list, hooks: dict[nn.Module, Any]) -> None:
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        with torch.no_grad():
            for args in batches:
                model(*args)
    finally:
        for h in handles:
            h.remove()


class _Mean:
    """The per-channel mean of a module's output (channels on axis 1, or the last axis
    for a Linear), and how many times it was called."""

    def __init__(self, linear: bool):
        self.linear, self.acc, self.calls = linear, StatsAccumulator(), 0

    def __call__(self, module, inputs, output) -> None:
        y = output.detach().to(torch.float64).cpu().numpy()
        self.acc.add("y", y.reshape(-1, y.shape[-1]) if self.linear else y)
        self.calls += 1

    @property
    def mean(self) -> np.ndarray:
        return self.acc.result()["y"].mean


def correct_empirically(
    model: nn.Module, calibration: Any, deployment: Deployment
) -> list[tuple[str, np.ndarray]]:
    """Correct the biases of ``model`` (the equalized module, changed in place) from
    ``calibration`` as the module docstring says; returns ``(layer, shift)`` per
    corrected layer. A layer called at several places (one bias for several inputs)
    is left alone."""
    batches = [tuple(args) for args in _batches(calibration, _float_dtype(model))]
    names = {m: n for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    order: list[nn.Module] = []
    reference = {m: _Mean(isinstance(m, nn.Linear)) for m in names}

    def recording(module: nn.Module):
        def hook(twin_module, inputs, output):
            if module not in order:
                order.append(module)
            reference[module](twin_module, inputs, output)

        return hook

    twin = copy.deepcopy(model)  # the float model, for the reference means
    twin_of = dict(zip(model.modules(), twin.modules(), strict=True))
    _run(twin, batches, {twin_of[m]: recording(m) for m in names})
    floats, biases, shifts = {}, {}, []
    try:
        _correct(model, batches, order, reference, names, deployment, floats, biases, shifts)
    except BaseException:
        # Nothing half-done: every weight and bias as it was.
        with torch.no_grad():
            for module, b in biases.items():
                if b is None:
                    module.bias = None
                else:
                    module.bias.copy_(b)
        raise
    finally:
        with torch.no_grad():
            for module, w in floats.items():
                module.weight.copy_(w)
    return shifts


def _correct(model, batches, order, reference, names, deployment, floats, biases, shifts):
    for module in order:
        if reference[module].calls != len(batches):
            continue  # called at several places, or not on every input
        w = module.weight
        floats[module] = w.detach().clone()
        axis = _out_axis(module) if deployment.per_channel else None
        dep = deployment
        rounded = weights_on_grid(
            w.detach().cpu().numpy(), dep.weight_bits, dep.weight_symmetric, axis, dep.quantizer
        )
        with torch.no_grad():
            w.copy_(torch.as_tensor(rounded, dtype=w.dtype, device=w.device))
        measured = _Mean(isinstance(module, nn.Linear))
        _run(model, batches, {module: measured})
        shift = measured.mean - reference[module].mean
        if not np.all(np.isfinite(shift)):
            raise CLEError(
                f"{names[module]}: the output mean is not finite on the calibration inputs"
            )
        with torch.no_grad():
            delta = torch.as_tensor(shift, dtype=w.dtype, device=w.device)
            biases[module] = None if module.bias is None else module.bias.detach().clone()
            if module.bias is None:
                module.bias = nn.Parameter(-delta, requires_grad=w.requires_grad)
            else:
                module.bias.sub_(delta)
        shifts.append((names[module], shift))
