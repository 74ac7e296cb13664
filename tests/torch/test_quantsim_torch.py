"""Simulated quantization of PyTorch models (cle_torch._quantsim)."""

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from cle_core._quality import quantize_array  # noqa: E402
from cle_torch._quantsim import evaluate_torch  # noqa: E402

_KEYS8 = {"fp32_sqnr", "fp32_top1", "w8_sqnr", "w8_top1", "w8a8_sqnr", "w8a8_top1"}


class _SamePadConv(nn.Conv2d):
    """A Conv2d subclass with its own forward, like EfficientNet's static-padding conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return nn.functional.conv2d(
            self.pad(x), self.weight, self.bias, self.stride, groups=self.groups
        )


def _cnn(seed=0, batch_norm=True):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(8))
    layers += [
        nn.ReLU(),
        _SamePadConv(8, 8, 3, groups=8),
        nn.ReLU6(),
        nn.ConvTranspose2d(8, 6, 2, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    ]
    model = nn.Sequential(*layers)
    if batch_norm:
        bn = model[1]
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return model


def _x(n=24, seed=1, hw=8):
    return np.random.default_rng(seed).normal(size=(n, 3, hw, hw)).astype(np.float32)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_models_are_left_untouched():
    model = _cnn().train()  # train mode must survive, and BN statistics must not move
    candidate = copy.deepcopy(model)
    before, before_c = _state(model), _state(candidate)
    res = evaluate_torch(model, candidate, inputs=_x())
    assert set(res) == _KEYS8
    for ref, m in ((before, model), (before_c, candidate)):
        after = m.state_dict()
        assert after.keys() == ref.keys()
        for k in ref:
            assert torch.equal(after[k], ref[k]), k
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_w8_sqnr_well_conditioned_and_candidate_none():
    res = evaluate_torch(_cnn(), inputs=_x())
    assert res["fp32_sqnr"] == math.inf and res["fp32_top1"] == 1.0
    assert 20 < res["w8_sqnr"] < math.inf
    assert math.isfinite(res["w8a8_sqnr"])
    assert 0.0 <= res["w8a8_top1"] <= 1.0


def test_identical_candidate_is_exact_and_perturbed_is_not():
    model = _cnn()
    same = evaluate_torch(model, copy.deepcopy(model), inputs=_x(), activations=False)
    assert same["fp32_sqnr"] == math.inf and same["fp32_top1"] == 1.0
    assert "w8a8_sqnr" not in same
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed[-1].weight.mul_(1.01)
        perturbed[-1].bias.mul_(1.01)
    res = evaluate_torch(model, perturbed, inputs=_x(), activations=False)
    assert res["fp32_sqnr"] == pytest.approx(40.0, abs=1e-3)  # 1 % everywhere


def test_activations_only_add_noise_when_weights_are_exact():
    # identity weights lie on the 8-bit grid: W8 is exact, A8 is the only noise
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(16))
    x = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32)
    res = evaluate_torch(model, inputs=x)
    assert res["w8_sqnr"] == math.inf
    assert math.isfinite(res["w8a8_sqnr"]) and res["w8a8_sqnr"] <= res["w8_sqnr"]
    # per-tensor asymmetric 8-bit noise is uniform: about 6.02 * 8 dB + the range factor
    assert 30 < res["w8a8_sqnr"] < 60


def test_weight_quantization_is_quantize_array():
    # one Linear: the W4 output equals the NumPy model with quantize_array weights
    torch.manual_seed(3)
    model = nn.Linear(5, 4)
    x = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
    w = model.weight.detach().numpy()
    b = model.bias.detach().numpy()
    ref = x @ w.T + b
    for per_channel, symmetric in ((False, False), (True, True)):
        wq = quantize_array(w, 4, symmetric, 0 if per_channel else None)
        noise = float(np.sum((ref - (x @ wq.T + b)) ** 2))
        expected = 10 * math.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)
        res = evaluate_torch(
            model,
            inputs=x,
            bits=4,
            per_channel=per_channel,
            symmetric=symmetric,
            activations=False,
        )
        assert set(res) == {"fp32_sqnr", "fp32_top1", "w4_sqnr", "w4_top1"}
        assert res["w4_sqnr"] == pytest.approx(expected, abs=1e-3)


def test_the_packed_in_projection_is_quantized_as_one_tensor():
    """``nn.MultiheadAttention``'s ``in_proj_weight`` is rounded as the deployment rounds
    the one MatMul the exporters write on it (one grid per tensor, or per row), and its
    ``out_proj`` as a Linear: the W4 output equals the module with those weights."""
    from cle_torch._quantsim import _quantize_weights

    torch.manual_seed(5)
    model = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    with torch.no_grad():
        model.in_proj_weight[16:] *= 10.0  # v's rows: they set the per-tensor grid
    x = torch.randn(3, 5, 8)
    for per_channel in (False, True):
        axis = 0 if per_channel else None
        expect = copy.deepcopy(model)
        with torch.no_grad():
            for p in (expect.in_proj_weight, expect.out_proj.weight):
                p.copy_(torch.from_numpy(quantize_array(p.detach().numpy(), 4, True, axis)))
        got = copy.deepcopy(model)
        _quantize_weights(got, 4, per_channel, True)
        torch.testing.assert_close(got.in_proj_weight, expect.in_proj_weight, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(got(x, x, x)[0], expect(x, x, x)[0])


def test_per_channel_helps_spread_channels():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))
    x = _x(16, hw=4)
    per_tensor = evaluate_torch(model, inputs=x, activations=False)["w8_sqnr"]
    per_channel = evaluate_torch(model, inputs=x, per_channel=True, activations=False)["w8_sqnr"]
    assert per_channel > per_tensor


def test_shared_weights_and_torch_tensor_inputs():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module (one weight) used twice
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    res = evaluate_torch(model, inputs=x, batch=7)
    assert all(math.isfinite(res[k]) for k in ("w8_sqnr", "w8a8_sqnr"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_weights_only_figures_match_the_onnx_evaluation():
    """The same model through torch.onnx.export: W8 (weights only) is the same grid both
    ways, so the same SQNR. W8A8 is not compared: the ONNX side is onnxruntime's
    quantize_static, which quantizes more tensors than the inputs of the layers."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from cle_onnx import evaluate

    model = _cnn(batch_norm=False).eval()  # the exporter would fold a BN before quantizing
    x = _x()
    buf = io.BytesIO()
    kwargs = {"dynamo": False} if "dynamo" in _export_params() else {}
    torch.onnx.export(
        model,
        (torch.from_numpy(x[:1]),),
        buf,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        **kwargs,
    )
    onnx_model = onnx.load_from_string(buf.getvalue())
    for per_channel in (False, True):
        t = evaluate_torch(model, inputs=x, per_channel=per_channel)
        o = evaluate(onnx_model, inputs=x, per_channel=per_channel)
        assert o.keys() == t.keys()
        assert o["w8_sqnr"] == pytest.approx(t["w8_sqnr"], abs=0.05)


def _export_params():
    import inspect

    return inspect.signature(torch.onnx.export).parameters


@pytest.mark.parametrize("activations", [True, False])
def test_deployed_only_gives_the_deployments_figure_alone(activations):
    """``deployed_only`` (what ``verify`` reads): the deployment's figure alone, equal
    to the full evaluation's."""
    model = _cnn()
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        candidate[-1].weight.mul_(1.01)
    key = "w8a8" if activations else "w8"
    x = _x()
    full = evaluate_torch(model, candidate, x, activations=activations, calibration=x[:12])
    alone = evaluate_torch(
        model, candidate, x, activations=activations, calibration=x[:12], deployed_only=True
    )
    assert set(alone) == {f"{key}_sqnr", f"{key}_top1"}
    assert alone == {k: full[k] for k in alone}
