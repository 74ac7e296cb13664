"""Calibration statistics: run the captured graph on a few inputs and measure, per IR
value, what the noise objective would otherwise estimate (see cle_core._stats)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from cle_core import CLEError
from cle_core._stats import ChannelStats, StatsAccumulator

from ._capture import Capture, _resolve_attr
from ._quantsim import _device

BATCH = 16


def _batches(calibration: Any) -> Iterator[tuple[torch.Tensor, ...]]:
    if isinstance(calibration, np.ndarray):
        calibration = torch.from_numpy(np.ascontiguousarray(calibration))
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise CLEError("calibration holds no inputs")
        for start in range(0, calibration.shape[0], BATCH):
            yield (calibration[start : start + BATCH],)
        return
    if not isinstance(calibration, Iterable):
        raise CLEError(
            "calibration must be a tensor or array of inputs (N, ...) or an iterable of "
            f"batches, got {type(calibration).__name__}"
        )
    for item in calibration:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        yield item if isinstance(item, tuple) else (item,)


def calibration_stats(cap: Capture, calibration: Any) -> dict[str, ChannelStats]:
    """Per-channel statistics of every IR value, measured by running the captured graph
    (in eval mode, without gradients) on ``calibration``."""
    wanted = set(cap.ir.values)
    root: dict[str, Any] = {}
    for n in cap.fx_graph.nodes:
        if n.op == "call_module":
            root[n.target] = cap.model.get_submodule(n.target)
        elif n.op == "get_attr":
            root[n.target] = _resolve_attr(cap, n.target)
    gm = fx.GraphModule(root, cap.fx_graph)
    device = _device(cap.model)
    acc = StatsAccumulator()

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in wanted and isinstance(out, torch.Tensor) and out.is_floating_point():
                acc.add(node.name, out.detach().float().cpu().numpy())
            return out

    count = 0
    with torch.no_grad():
        for batch in _batches(calibration):
            args = tuple(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch)
            try:
                Recorder(gm).run(*args)
            except Exception as exc:
                raise CLEError(f"the model does not run on the calibration inputs: {exc}") from None
            count += 1
    if not count:
        raise CLEError("calibration holds no inputs")
    return acc.result()
