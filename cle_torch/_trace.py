"""Capture a module's forward with torch.fx symbolic tracing, leaving no trace on it.

Why torch.fx symbolic tracing. It runs the Python ``forward`` once with proxies and
records, at the torch level, both module calls (``self.bn(x)``) and functional calls
(``F.conv2d(x, self.weight, ...)``, ``F.relu6``, ``+``, ``torch.cat``, ``x.view``), with
the qualified names of modules and parameters intact: exactly what the write-back needs
to find a parameter or a module again. It needs no example input and takes about 16 ms
on EfficientNet-Lite0, and its graph can be turned back into a runnable
``torch.fx.GraphModule`` when a result cannot be written onto the module tree.
``torch.export`` was the alternative: it needs example inputs, lowers everything to ATen
operators (a BatchNorm module becomes ``_native_batch_norm_legit_no_training`` over
lifted parameters) and keeps the module structure only as metadata, which the write-back
would have to map back. Where symbolic tracing fails (data-dependent control flow, calls
that do not accept proxies) the error names the module and how to get past it: make it a
leaf (it is then kept as is and blocks equalization around it) or rewrite the branch.

Tracing goes through every module except torch's own (``torch.nn``, and subclasses of the
layer / BN / activation / pool types that keep torch's ``forward``), so a custom Conv
subclass such as EfficientNet's ``Conv2dStaticSamePadding`` (which pads, then calls
``F.conv2d(x, self.weight, self.bias, ...)``) is seen as a pad and a convolution whose
parameters live on that module. ``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``
and the decoder ones are traced as the computation their documentation gives
(``_decompose``), not as their fused fast path, also where one is the model itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.padding import _ConstantPadNd

from ._decompose import decomposition, fused, root_forward
from ._modules import PerChannelClamp, TrainingModeError, UntraceableModelError

# Module types the translator understands, with their number of spatial axes (BN: the
# input rank; None where 2 and 3 are both allowed).
CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONVT_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
BN_MODULES = {nn.BatchNorm1d: None, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5, nn.SyncBatchNorm: None}
MAXPOOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
AVGPOOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
ADAPTIVE_AVG_MODULES = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
KNOWN_MODULES: tuple[type, ...] = (
    *CONV_MODULES,
    *CONVT_MODULES,
    *BN_MODULES,
    *MAXPOOL_MODULES,
    *AVGPOOL_MODULES,
    *ADAPTIVE_AVG_MODULES,
    *DROPOUT_MODULES,
    nn.Linear,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Flatten,
    nn.Upsample,
    _ConstantPadNd,
    PerChannelClamp,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
)


def known_base(cls: type) -> type | None:
    """The known module type ``cls`` behaves as: itself, or the known base class whose
    ``forward`` it keeps (a subclass that overrides ``forward`` is traced through)."""
    for klass in cls.__mro__:
        if klass in KNOWN_MODULES:
            return klass
        if "forward" in vars(klass) or "_conv_forward" in vars(klass):
            return None
    return None


class Tracer(fx.Tracer):
    """Traces through everything except torch's own modules and the caller's leaves."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaves = list(leaf_modules)
        bad = [t for t in leaves if not isinstance(t, (type, str))]
        if bad:
            raise TypeError(f"leaf_modules takes module types or qualified names, got {bad!r}")
        self.leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self.leaf_names = {t for t in leaves if isinstance(t, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if known_base(type(m)) is not None:
            return True
        if decomposition(m) is not None:  # traced as its documented computation
            return False
        if fused(m):  # a subclass that overrides what the decomposition stands for
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        # fx finds a parameter's name by walking every parameter of the model at each
        # access (a custom Conv's forward reading self.weight): quadratic in the
        # layers, half of EfficientNet-Lite0's trace. The same first name, looked up.
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            names = self.__dict__.get("_parameter_names")
            if names is None or names[0] is not self.root:
                found: dict[int, str] = {}
                for n, p in self.root.named_parameters():
                    found.setdefault(id(p), n)
                names = self._parameter_names = (self.root, found)
            n = names[1].get(id(attr_val))
            if n is not None:
                if n not in parameter_proxy_cache:
                    parameter_proxy_cache[n] = self.create_proxy("get_attr", n, (), {})
                return parameter_proxy_cache[n]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        parts = decomposition(m)
        if parts is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = parts
        return super().call_module(m, forward, args, kwargs)


def check_eval(model: nn.Module, allow_training_mode: bool) -> None:
    if allow_training_mode:
        return
    training = [name or "(root)" for name, m in model.named_modules() if m.training]
    if training:
        more = f" and {len(training) - 3} more" if len(training) > 3 else ""
        raise TrainingModeError(
            f"the model is in training mode ({', '.join(training[:3])}{more}): batch norms "
            "would use batch statistics and dropout would be active. Call model.eval() "
            "first, or pass allow_training_mode=True to equalize it as in eval mode "
            "(the training flags are kept)."
        )


def _temp_biases(model: nn.Module, tracer: Tracer) -> dict[str, tuple[nn.Module, int]]:
    """Bias-less Conv / Linear modules that are traced through (their own ``forward``).

    While tracing they get a temporary zero bias, so that the graph shows whether their
    forward passes ``self.bias`` on to the convolution: only then can a bias created by
    BN folding be given to the module in place."""
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, (_ConvNd, nn.Linear)) or tracer.is_leaf_module(m, name):
            continue
        if "bias" not in m._parameters or m._parameters["bias"] is not None:
            continue
        if not isinstance(m._parameters.get("weight"), nn.Parameter):
            continue
        found[name] = (m, m.out_features if isinstance(m, nn.Linear) else m.out_channels)
    return found


def trace(
    model: nn.Module, leaf_modules: Iterable[type | str] = (), allow_training_mode: bool = False
) -> tuple[fx.Graph, dict[str, torch.Tensor], dict[str, torch.Size]]:
    """Symbolically trace ``model`` in eval mode and restore it exactly.

    Returns the graph, the tensor constants the tracer created (FX stores them on the
    root module; they are taken off again) and the temporary biases (qualified name ->
    shape; the graph reads them with ``get_attr``, the model no longer has them)."""
    tracer = Tracer(leaf_modules)
    temps = _temp_biases(model, tracer)
    flags = [(m, m.training) for m in model.modules()] if allow_training_mode else []
    before = set(vars(model))
    constants: dict[str, torch.Tensor] = {}
    cls, forward = type(model), root_forward(model)
    try:
        if forward is not None:  # tracing runs the root's class forward, not call_module
            model.__class__ = type(cls.__name__, (cls,), {"forward": forward})
        for m, _ in flags:
            m.training = False
        for m, out in temps.values():
            w = m.weight
            m._parameters["bias"] = nn.Parameter(
                torch.zeros(out, dtype=w.dtype, device=w.device), requires_grad=False
            )
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            raise UntraceableModelError(_untraceable_message(model, exc)) from exc
    finally:
        model.__class__ = cls
        for m, _ in temps.values():
            m._parameters["bias"] = None
        for m, flag in flags:
            m.training = flag
        for key in set(vars(model)) - before:
            value = vars(model).pop(key)
            if isinstance(value, torch.Tensor):
                constants[key] = value
    shapes = {f"{n}.bias" if n else "bias": torch.Size([out]) for n, (_, out) in temps.items()}
    return graph, constants, shapes


def _untraceable_message(model: nn.Module, exc: Exception) -> str:
    """Say which module's forward failed (the innermost one on the traceback)."""
    where = ""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    names = {id(m): name for name, m in model.named_modules()}
    for frame in reversed(frames):
        slf = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and id(slf) in names:
            where = f" in {names[id(slf)] or '(root)'} ({type(slf).__name__}.forward)"
            break
    why = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    # Hugging Face's models build masks, positions and caches with Python control flow
    # on tensor values: making a leaf of the module that fails there (the whole
    # LlamaModel, GPT2Model ...) would leave nothing to equalize.
    hf = any(type(m).__module__.startswith("transformers.") for m in model.modules())
    route = (
        " This is a Hugging Face transformers model, which torch.fx does not trace in "
        "general: export it to ONNX (torch.onnx.export, dynamo=True) and equalize the "
        "file with cle_onnx (docs: Transformers and ConvNeXt, Hugging Face models)."
        if hf
        else ""
    )
    return (
        f"torch.fx cannot trace {type(model).__name__}{where}: {why}.{route} "
        "Hints: mark the module that fails as a leaf (leaf_modules=[TheModuleClass] or its "
        "qualified name; it is then left as is and blocks equalization around it), or "
        "rewrite data-dependent Python control flow in its forward; pass dummy_input or "
        "input_shapes so that graph inputs have known shapes."
    )
