"""Regression tests for the data-safety faults of issue 9 in the PyTorch backend."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import cle_core  # noqa: E402
import cle_torch  # noqa: E402


def small(tiny_variance: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    if tiny_variance:  # folding multiplies the weight by gamma / sqrt(var + eps) ~ 3e6
        with torch.no_grad():
            model[1].running_var.fill_(1e-9)
            model[1].weight.fill_(100.0)
        model[1].eps = 1e-9
    return model.eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_float16_overflow_names_the_layer_and_changes_nothing():
    model = small(tiny_variance=True).half()
    before = state(model)
    with pytest.raises(cle_core.NonFiniteError, match=r"0\.weight.*float16"):
        cle_torch.equalize_model(model, (1, 3, 8, 8), scale=False)
    assert unchanged(model, before) and isinstance(model[1], nn.BatchNorm2d)


def test_float16_within_range_still_works():
    model = small().half()
    out, report = cle_torch.equalize_model(model, (1, 3, 8, 8))
    assert report.folds and all(torch.isfinite(p).all() for p in out.parameters())


def test_meta_device_is_a_clear_error():
    with torch.device("meta"):
        model = small()
    with pytest.raises(cle_core.CLEError, match="meta device"):
        cle_torch.equalize_model(model, (1, 3, 8, 8))


@pytest.mark.parametrize(
    "shapes, message",
    [
        ((1, 3, 8), "rank-4"),
        ((3, 8, 8), "rank-4"),
        ((1, 5, 8, 8), "5 channels"),
        ("1,3,8,8", "must be a shape"),
        ([(1, 3, 8, 8), (1, 3, 8, 8)], "2 input shapes"),
        ((1, -3, 8, 8), "must be a shape"),
    ],
)
def test_wrong_input_shapes_are_errors_not_skipped_layers(shapes, message):
    model = small()
    before = state(model)
    with pytest.raises(cle_core.CLEError, match=message):
        cle_torch.equalize_model(model, shapes)
    assert unchanged(model, before)
