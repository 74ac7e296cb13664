"""Modules the write-back puts into a model, and the torch backend's errors."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cle_core import CLEError, UnsupportedModelError


class UntraceableModelError(UnsupportedModelError):
    """torch.fx cannot capture the model's forward (data-dependent control flow, a call
    that does not accept proxies, ...). The message says why and what to try."""


class TrainingModeError(CLEError):
    """The model (or one of its submodules) is in training mode."""


class NotInPlaceError(CLEError):
    """The result cannot be written onto the model's own module tree, and the caller
    asked for in-place only (``allow_graph_module=False`` or
    :func:`cle_torch.fold_all_batch_norms`)."""


class PerChannelClamp(nn.Module):
    """``clamp(x, lo[c], hi[c])`` with one bound per channel ``c``.

    Cross-layer scaling divides channel ``c`` of a bounded activation's input by
    ``s_c``; ``clip(x / s, 0, 6) = clip(x, 0, 6 s) / s`` keeps the function only when the
    bound moves per channel, so a scaled ReLU6 / Hardtanh / clamp becomes this module.
    High-bias absorption lowers the lower bound per channel the same way.

    ``lo`` and ``hi`` are buffers shaped ``(C, 1, ..., 1)`` with one trailing 1 per
    spatial axis, so they broadcast on the channel axis of ``(N, C, *spatial)`` (and of
    an unbatched ``(C, *spatial)``); ``hi`` may be ``+inf`` and ``lo`` ``-inf``. They
    follow the module through ``.to()``, ``.half()`` and ``state_dict``.
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, source: str = ""):
        super().__init__()
        if lo.shape != hi.shape or lo.dim() < 1:
            raise ValueError(f"lo {tuple(lo.shape)} and hi {tuple(hi.shape)} must match")
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        self.source = source
        self._widest()

    @classmethod
    def from_bounds(
        cls,
        lo: np.ndarray,
        hi: np.ndarray,
        spatial_dims: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        source: str = "",
        shape: tuple[int, ...] | None = None,
    ) -> PerChannelClamp:
        """Build from per-channel (or scalar) NumPy bounds for a tensor with
        ``spatial_dims`` axes after the channel axis, or of ``shape`` where given (the
        bounds of a channel-last tensor: ``(1, 1, C)``, see
        :func:`cle_core.toolkit.broadcast_shape`)."""
        lo = np.asarray(lo, np.float64).reshape(-1)
        hi = np.asarray(hi, np.float64).reshape(-1)
        channels = max(lo.size, hi.size)
        if shape is None:
            shape = (channels,) + (1,) * max(spatial_dims, 0)

        def tensor(a: np.ndarray) -> torch.Tensor:
            a = np.broadcast_to(a, (channels,)).reshape(shape)
            return torch.tensor(a, dtype=dtype, device=device)

        return cls(tensor(lo), tensor(hi), source)

    @property
    def channels(self) -> int:
        return self.lo.numel()

    def _widest(self) -> None:
        # Plain floats (None where infinite): constants to tracing and export, and right
        # for any dtype. Recomputed whenever the bounds are loaded.
        lo, hi = float(self.lo.min()), float(self.hi.max())
        self._lo_all = lo if math.isfinite(lo) else None
        self._hi_all = hi if math.isfinite(hi) else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._widest()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A clamp to the widest bounds first, then the per-channel bounds: the same
        # function, written so that an exported graph starts with a scalar Clip, which
        # quantizers (onnxruntime's quantize_static) merge into the layer before it and
        # quantize at its bounded output, as cle_onnx writes the same clip.
        if self._lo_all is not None or self._hi_all is not None:
            x = torch.clamp(x, self._lo_all, self._hi_all)
        return torch.clamp(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        was = f", was {self.source}" if self.source else ""
        return f"channels={self.channels}{was}"
