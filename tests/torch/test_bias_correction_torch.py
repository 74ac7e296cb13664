"""Bias correction through the PyTorch backend: analytic and empirical."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cle_torch  # noqa: E402
from cle_core import CLEError  # noqa: E402
from cle_torch import _empirical  # noqa: E402
from tests.helpers import torch_models as tm  # noqa: E402


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("cle_torch").setLevel(logging.ERROR)


def _mean_error(model, eq, x):
    """Mean over examples and positions of the output error with weights on the
    per-tensor symmetric int8 grid, per channel, averaged in magnitude."""
    from cle_core.quality import deployed_weights

    rounded = copy.deepcopy(eq)
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.as_tensor(deployed_weights(m.weight.numpy(), 8, True)))
        y, yq = model(x), rounded(x)
    return float(np.abs((yq - y).mean(dim=0).numpy()).mean())


@pytest.mark.parametrize("form", [True, "empirical"])
def test_bias_correction_lowers_the_mean_error_of_the_rounded_model(form):
    model, shape = tm.mobilenet_v2(0)
    model.eval()
    x = torch.randn(32, *shape[1:])
    plain, _ = cle_torch.equalize_model(copy.deepcopy(model))
    corrected, report = cle_torch.equalize_model(
        copy.deepcopy(model), bias_correction=form, calibration=x
    )
    assert len(report.bias_corrections) >= 5
    source = "calibration (empirical)" if form == "empirical" else "calibration"
    assert {r.input_mean for r in report.bias_corrections} <= {source, "batch norms"}
    assert _mean_error(model, corrected, x) < _mean_error(model, plain, x) / 2


def test_empirical_needs_calibration_and_leaves_nothing_half_done(monkeypatch):
    model, shape = tm.mobilenet_v2(0)
    model.eval()
    with pytest.raises(CLEError, match="empirical bias correction measures on calibration"):
        cle_torch.equalize_model(copy.deepcopy(model), bias_correction="empirical")
    x = torch.randn(8, *shape[1:])
    calls = []
    real = _empirical.weights_on_grid

    def fails_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(_empirical, "weights_on_grid", fails_third)
    eq, _ = cle_torch.equalize_model(copy.deepcopy(model))
    before = {k: v.clone() for k, v in eq.state_dict().items()}
    from cle_core import Deployment

    with pytest.raises(RuntimeError, match="disk on fire"):
        _empirical.correct_empirically(eq, x, Deployment())
    after = eq.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
