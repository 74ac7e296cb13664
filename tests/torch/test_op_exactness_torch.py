"""Which argument values of each operation the PyTorch translator carries a region
through: the written-down rule of issue 17 (docs/torch.rst, "Exact argument values").

Each row of ``ROWS`` puts one operation between two layers, ``c1 -> BatchNorm2d -> op ->
c2`` (mostly convolutions), with c1's output channels spread over three decades and c2's
input channels the other way, so that equalization really scales: the scales are chosen
by the weight-range balance (``objective="balance"``), which spreads them by a factor of
40 or more here, and must span more than 10. (Exactness does not depend on which
positive scales are chosen.) The row says what must happen:

- ``EQ``: a region runs from c1 through the op to c2, and the equalized model computes
  the same function.
- ``REFUSED``: no region crosses the op, a skip record gives the reason (the op's name
  and the argument value that keeps it out), and the model still computes the same
  function (the batch norm is folded all the same).

Tolerance, both cases: the SQNR of the output against the original is at least 100 dB
in float32 (measured: 135 dB or more where a region is scaled, 124 dB or more where only
the batch norm is folded; rounding only). Random ops (dropout in training mode) run with
the same seed before and after.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
fx = torch.fx
nn = torch.nn
F = torch.nn.functional

import cle_torch  # noqa: E402

EQ, REFUSED = "equalized", "refused"
MIN_SQNR_DB = 100.0
SHAPE = (2, 3, 8, 8)


# --- the models -------------------------------------------------------------------------


def spread(layer: nn.Module, axis: str, lo: float, hi: float) -> None:
    """Multiply the weight's output (``axis="out"``) or input channels by factors from
    ``10**lo`` to ``10**hi``."""
    w = layer.weight
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    dim = (1 if transposed else 0) if axis == "out" else (0 if transposed else 1)
    shape = [1] * w.dim()
    shape[dim] = w.shape[dim]
    with torch.no_grad():
        w.mul_(torch.logspace(lo, hi, w.shape[dim]).view(shape))


def randomize_bn(bn: nn.Module) -> nn.Module:
    """Statistics away from (0, 1), gammas over two decades, positive betas (high biases
    for the absorption to move)."""
    c = bn.num_features
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.copy_(torch.logspace(-1, 1, c)[torch.randperm(c)])
            bn.bias.normal_().add_(2.0)
    return bn


class Between(nn.Module):
    """``c1 -> bn -> op -> c2``; ``op`` is a module or a function of one tensor."""

    def __init__(self, op: Any, c1: nn.Module | None = None, c2: nn.Module | None = None):
        super().__init__()
        self.c1 = c1 if c1 is not None else nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.op = op
        self.c2 = c2 if c2 is not None else nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.op(self.bn(self.c1(x))))


class Branches(nn.Module):
    """``combine(relu(bn(c1 x)), relu(b x)) -> c2``: concatenations and sums."""

    def __init__(self, combine, c2_in: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.combine = combine
        self.c2 = nn.Conv2d(c2_in, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.combine(torch.relu(self.bn(self.c1(x))), torch.relu(self.b(x))))


class Functional(nn.Module):
    """The two convolutions as ``F.conv2d`` calls on the modules' parameters."""

    def __init__(self, **conv_args):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 3)
        self.conv_args = conv_args

    def forward(self, x):
        y = F.conv2d(x, self.c1.weight, None, **self.conv_args)
        return F.conv2d(torch.relu(self.bn(y)), self.c2.weight, self.c2.bias, **self.conv_args)


class Scale(nn.Module):
    """``x * self.factor`` with a parameter: one value per channel, or per position of
    axis ``along``."""

    def __init__(self, along: int = 1):
        super().__init__()
        shape = [1, 1, 1, 1]
        shape[along] = 8
        self.factor = nn.Parameter(torch.linspace(-1, 2, 8).view(shape))

    def forward(self, x):
        return x * self.factor


class FirstOf(nn.Module):
    """The first output of a module that returns a tuple."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


class Gate(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(pool(x)))))``."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)

    def forward(self, x):
        p = x.mean((2, 3), keepdim=True) if self.functional else self.pool(x)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(p))))


def nd_model(nd: int, op: Any = None) -> tuple[nn.Module, tuple]:
    """Conv1d / Conv3d layers (and their batch norm) around ``op`` (a ReLU if None)."""
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[nd]
    op = nn.ReLU() if op is None else op
    model = Between(op, conv(3, 8, 3, padding=1, bias=False), conv(8, 4, 3, padding=1))
    model.bn = bn(8)
    return model, (2, 3) + (6,) * nd


def linear_model() -> tuple[nn.Module, tuple]:
    """Linear -> BatchNorm1d -> ReLU -> Linear on (N, features)."""
    model = Between(nn.ReLU(), nn.Linear(6, 8, bias=False), nn.Linear(8, 4))
    model.bn = nn.BatchNorm1d(8)
    return model, (2, 6)


def to_linear(op, features: int = 8 * 16):
    """``op`` turns the (N, 8, 4, 4) activation into the input of a Linear layer."""
    return lambda: (Between(op, c2=nn.Linear(features, 4)), (2, 3, 4, 4))


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    build: Any  # () -> the op, or () -> (model, input shape)
    expect: str
    why: str = ""  # REFUSED: a substring of the skip reason (the op and the argument)

    def make(self) -> tuple[nn.Module, tuple]:
        built = self.build()
        return built if isinstance(built, tuple) else (Between(built), SHAPE)


def fn(f):
    """The op as a function call in the model's forward."""
    return lambda: f


def pad(**kw):
    return fn(lambda y: F.pad(y, (1, 1, 1, 1), **kw))


def interp(**kw):
    return fn(lambda y: F.interpolate(y, **kw))


def branches(combine, c2_in: int = 8):
    return lambda: (Branches(combine, c2_in), SHAPE)


def relu_then(bn: nn.Module):
    """A batch norm after a ReLU: it cannot be folded, it is carried as an affine."""
    return lambda: nn.Sequential(nn.ReLU(), randomize_bn(bn))


def padded_convs(mode: str):
    c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False, padding_mode=mode)
    return Between(nn.ReLU(), c1, nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode=mode)), SHAPE


def convt_sink(**kw):
    return lambda: (Between(nn.ReLU(), c2=nn.ConvTranspose2d(8, 8, 3, **kw)), SHAPE)


def convt_source(**kw):
    c1 = lambda: nn.ConvTranspose2d(4, 8, 3, bias=False, **kw)  # noqa: E731
    return lambda: (Between(nn.ReLU(), c1=c1()), (2, 4, 8, 8))


# fmt: off
ROWS = [
    # activations: positively homogeneous, or bounds that become per channel
    Row("ReLU", nn.ReLU, EQ),
    Row("ReLU(inplace)", lambda: nn.ReLU(inplace=True), EQ),
    Row("ReLU6", nn.ReLU6, EQ),
    Row("F.relu6", fn(F.relu6), EQ),
    Row("Hardtanh(-2, 3)", lambda: nn.Hardtanh(-2.0, 3.0), EQ),
    Row("Hardtanh(1, 3): min_val > 0", lambda: nn.Hardtanh(1.0, 3.0), EQ),
    Row("Hardtanh(-3, -1): negative bounds", lambda: nn.Hardtanh(-3.0, -1.0), EQ),
    Row("clamp(-1, 2)", fn(lambda y: torch.clamp(y, -1.0, 2.0)), EQ),
    Row("clamp_min(0.5)", fn(lambda y: torch.clamp_min(y, 0.5)), EQ),
    Row("Tensor.clamp_max(-0.5)", fn(lambda y: y.clamp_max(-0.5)), EQ),
    Row("clamp(min=tensor)", fn(lambda y: torch.clamp(y, min=torch.zeros(1, 8, 1, 1))),
        REFUSED, "clamp left out: min is a tensor"),
    Row("LeakyReLU(0.01)", nn.LeakyReLU, EQ),
    Row("LeakyReLU(-0.5): negative slope", lambda: nn.LeakyReLU(-0.5), EQ),
    Row("LeakyReLU(2): slope > 1", lambda: nn.LeakyReLU(2.0), EQ),
    Row("PReLU(1)", lambda: nn.PReLU(1, 0.25), EQ),
    Row("PReLU(8), negative weights", lambda: nn.PReLU(8, -0.7), EQ),
    Row("SiLU", nn.SiLU, REFUSED, "SiLU left out"),
    # identities
    Row("Identity", nn.Identity, EQ),
    Row("Tensor.contiguous", fn(lambda y: torch.relu(y).contiguous()), EQ),
    Row("Dropout (eval)", lambda: nn.Dropout(0.5), EQ),
    Row("AlphaDropout (eval)", lambda: nn.AlphaDropout(0.5), EQ),
    Row("F.dropout(training=False)", fn(lambda y: F.dropout(y, 0.5, training=False)), EQ),
    Row("F.dropout(training=True)", fn(lambda y: F.dropout(y, 0.5, training=True)),
        REFUSED, "dropout left out: training=True"),
    Row("F.alpha_dropout(training=True)", fn(lambda y: F.alpha_dropout(y, 0.5, True)),
        REFUSED, "alpha_dropout left out: training=True"),
    # products and sums
    Row("* -2", fn(lambda y: y * -2.0), EQ),
    Row("* 0", fn(lambda y: torch.relu(y) * 0), EQ),
    Row("Tensor.mul(3)", fn(lambda y: y.mul(3.0)), EQ),
    Row("Tensor.mul_(3)", fn(lambda y: torch.relu(y).mul_(3.0)),
        REFUSED, "Tensor.mul_ left out: in place"),
    Row("* parameter (one per channel)", Scale, EQ),
    Row("* parameter (one per column)", lambda: Scale(along=3), REFUSED,
        "its factor lies along axis 3"),
    Row("+ 1", fn(lambda y: y + 1.0), REFUSED, "add left out: adds the number 1.0"),
    Row("squeeze-excitation gate (modules)", Gate, EQ),
    Row("squeeze-excitation gate (mean)", lambda: Gate(functional=True), EQ),
    Row("x * mean(x): the gate is scaled too", fn(lambda y: y * y.mean((2, 3), keepdim=True)),
        REFUSED, "is read by mul"),
    # a product of two feature maps: the first carries the channels, the second must
    # stay unscaled (here both are one)
    Row("x * x", fn(lambda y: y * y), REFUSED, "which it does not carry"),
    Row("a + b", branches(lambda a, b: a + b), EQ),
    Row("torch.add(a, b, alpha=2)", branches(lambda a, b: torch.add(a, b, alpha=2)),
        REFUSED, "add left out: alpha=2"),
    Row("a - b", branches(lambda a, b: a - b), REFUSED, "sub left out"),
    Row("cat(dim=1)", branches(lambda a, b: torch.cat([a, b], 1), 16), EQ),
    Row("cat(dim=-3)", branches(lambda a, b: torch.cat([a, b], -3), 16), EQ),
    Row("cat(dim=2)", branches(lambda a, b: torch.cat([a, b], 2)), REFUSED, "cat left out: dim=2"),
    Row("cat(dim=-1)", branches(lambda a, b: torch.cat([a, b], -1)),
        REFUSED, "cat left out: dim=-1"),
    # padding
    Row("ZeroPad2d", lambda: nn.ZeroPad2d(1), EQ),
    Row("ConstantPad2d(0)", lambda: nn.ConstantPad2d((1, 2, 0, 1), 0.0), EQ),
    Row("ConstantPad2d(1.5)", lambda: nn.ConstantPad2d(1, 1.5),
        REFUSED, "ConstantPad2d left out: value=1.5"),
    Row("F.pad constant 0", pad(), EQ),
    Row("F.pad value=1", pad(value=1.0), REFUSED, "pad left out: value=1.0"),
    Row("F.pad reflect", pad(mode="reflect"), REFUSED, "pad left out: mode='reflect'"),
    Row("F.pad replicate", pad(mode="replicate"), REFUSED, "pad left out: mode='replicate'"),
    Row("F.pad circular", pad(mode="circular"), REFUSED, "pad left out: mode='circular'"),
    Row("ReflectionPad2d", lambda: nn.ReflectionPad2d(1), REFUSED, "ReflectionPad2d left out"),
    # pools
    Row("MaxPool2d(3, 1, 1)", lambda: nn.MaxPool2d(3, 1, 1), EQ),
    Row("MaxPool2d(dilation=2)", lambda: nn.MaxPool2d(3, 1, 1, dilation=2), EQ),
    Row("MaxPool2d(ceil_mode=True)", lambda: nn.MaxPool2d(3, 2, ceil_mode=True),
        REFUSED, "MaxPool2d left out: ceil_mode=True"),
    Row("MaxPool2d(return_indices=True)", lambda: FirstOf(nn.MaxPool2d(2, return_indices=True)),
        REFUSED, "MaxPool2d left out: return_indices=True"),
    Row("F.max_pool2d(return_indices=True)",
        fn(lambda y: F.max_pool2d(y, 2, return_indices=True)[0]),
        REFUSED, "max_pool2d_with_indices left out"),
    Row("AvgPool2d(count_include_pad=True)", lambda: nn.AvgPool2d(3, 1, 1), EQ),
    Row("AvgPool2d(count_include_pad=False)",
        lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False), EQ),
    Row("AvgPool2d(divisor_override=5)", lambda: nn.AvgPool2d(3, 1, 1, divisor_override=5),
        REFUSED, "AvgPool2d left out: divisor_override=5"),
    Row("AvgPool2d(ceil_mode=True)", lambda: nn.AvgPool2d(3, 2, ceil_mode=True),
        REFUSED, "AvgPool2d left out: ceil_mode=True"),
    Row("AdaptiveAvgPool2d(1)", lambda: nn.AdaptiveAvgPool2d(1), EQ),
    Row("AdaptiveAvgPool2d(2)", lambda: nn.AdaptiveAvgPool2d(2),
        REFUSED, "AdaptiveAvgPool2d left out: output_size=2"),
    Row("mean((2, 3), keepdim=True)", fn(lambda y: y.mean((2, 3), keepdim=True)), EQ),
    # upsampling: every mode is a fixed linear combination of one channel's values
    Row("interpolate nearest", interp(scale_factor=2), EQ),
    Row("interpolate nearest-exact", interp(scale_factor=1.5, mode="nearest-exact"), EQ),
    Row("interpolate bilinear", interp(scale_factor=2, mode="bilinear"), EQ),
    Row("interpolate bilinear, align_corners",
        interp(size=(11, 11), mode="bilinear", align_corners=True), EQ),
    Row("interpolate bicubic", interp(scale_factor=2, mode="bicubic"), EQ),
    Row("interpolate bicubic, align_corners",
        interp(scale_factor=2, mode="bicubic", align_corners=True), EQ),
    Row("interpolate area", interp(size=(5, 5), mode="area"), EQ),
    Row("interpolate bilinear, antialias",
        interp(scale_factor=0.5, mode="bilinear", antialias=True), EQ),
    Row("interpolate bicubic, antialias", interp(size=(5, 5), mode="bicubic", antialias=True), EQ),
    Row("Upsample bilinear", lambda: nn.Upsample(scale_factor=1.5, mode="bilinear"), EQ),
    Row("interpolate linear (Conv1d)",
        lambda: nd_model(1, lambda y: F.interpolate(y, scale_factor=2, mode="linear")), EQ),
    Row("interpolate trilinear (Conv3d)",
        lambda: nd_model(3, lambda y: F.interpolate(y, scale_factor=2, mode="trilinear")), EQ),
    # into a Linear layer
    Row("flatten(1) -> Linear", to_linear(lambda y: torch.flatten(torch.relu(y), 1)), EQ),
    Row("Flatten -> Linear", to_linear(nn.Sequential(nn.ReLU(), nn.Flatten())), EQ),
    Row("view(size(0), -1) -> Linear", to_linear(lambda y: y.view(y.size(0), -1)), EQ),
    Row("reshape(shape[0], -1) -> Linear", to_linear(lambda y: y.reshape(y.shape[0], -1)), EQ),
    Row("view(-1, 128) -> Linear", to_linear(lambda y: y.view(-1, 128)),
        REFUSED, "Tensor.view left out: not a reshape to (batch, -1)"),
    Row("flatten(0) -> Linear", to_linear(lambda y: torch.flatten(y, 0).view(2, -1)),
        REFUSED, "flatten left out: start_dim=0"),
    Row("mean((2, 3)) -> Linear", to_linear(lambda y: y.mean((2, 3)), 8), EQ),
    Row("mean(3) -> Linear", to_linear(lambda y: y.mean(3).mean(2), 8),
        REFUSED, "Tensor.mean left out: dim=3"),
    # batch norms between the layers
    Row("BatchNorm2d, carried", relu_then(nn.BatchNorm2d(8)), EQ),
    Row("BatchNorm2d(affine=False)", relu_then(nn.BatchNorm2d(8, affine=False)), EQ),
    Row("BatchNorm2d(momentum=None)", relu_then(nn.BatchNorm2d(8, momentum=None)), EQ),
    Row("BatchNorm2d(track_running_stats=False)",
        relu_then(nn.BatchNorm2d(8, track_running_stats=False)),
        REFUSED, "BatchNorm2d left out: track_running_stats=False"),
    # the layers themselves
    *(Row(f"Conv2d(padding_mode={m!r})", lambda m=m: padded_convs(m), EQ)
      for m in ("zeros", "reflect", "replicate", "circular")),
    Row("F.conv2d(padding='same')", lambda: (Functional(padding="same"), SHAPE), EQ),
    Row("F.conv2d(stride=2, dilation=2)",
        lambda: (Functional(stride=2, dilation=2, padding=2), (2, 3, 12, 12)), EQ),
    Row("Conv1d", lambda: nd_model(1), EQ),
    Row("Conv3d", lambda: nd_model(3), EQ),
    Row("Linear", linear_model, EQ),
    Row("ConvTranspose2d sink", convt_sink(), EQ),
    Row("ConvTranspose2d sink, groups=2", convt_sink(groups=2), EQ),
    Row("ConvTranspose2d sink, depthwise", convt_sink(groups=8, padding=1), EQ),
    Row("ConvTranspose2d sink, output_padding", convt_sink(stride=2, output_padding=1), EQ),
    Row("ConvTranspose2d sink, all of them",
        convt_sink(stride=2, padding=1, output_padding=1, groups=4, dilation=2), EQ),
    Row("ConvTranspose2d source", convt_source(padding=1), EQ),
    Row("ConvTranspose2d source, groups=4", convt_source(groups=4, padding=1), EQ),
    Row("ConvTranspose2d source, output_padding, dilation, groups",
        convt_source(stride=2, output_padding=1, dilation=2, groups=2), EQ),
]
# fmt: on


# --- the check ----------------------------------------------------------------------------


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.double(), other.double()
    noise = float(((reference - other) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((reference**2).sum()) / noise)


def prepare(model: nn.Module) -> nn.Module:
    """Channel ranges over decades; randomized batch norms."""
    spread(model.c1, "out", -2.0, 1.0)
    spread(model.c2, "in", 1.0, -2.0)
    randomize_bn(model.bn)
    return model.eval()


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout mask before and after
    with torch.no_grad():
        return model(x)


def through(region) -> bool:
    return "c1" in region.sources and "c2" in region.sinks


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_op_is_equalized_exactly_or_refused_with_a_reason(row):
    torch.manual_seed(0)
    model, shape = row.make()
    model = prepare(model)
    x = torch.randn(*shape) * 2
    y0 = forward(model, x)
    new, report = cle_torch.equalize_model(
        copy.deepcopy(model), input_shapes=shape, objective="balance"
    )
    y1 = forward(new, x)
    assert sqnr_db(y0, y1) >= MIN_SQNR_DB, report.summary()
    regions = [r for r in report.regions if through(r)]
    reasons = [s.reason for s in report.skipped if s.stage in ("translate", "scale")]
    if row.expect == EQ:
        assert len(regions) == 1, (reasons, report.summary())
        scales = regions[0].scales
        assert scales.max() / scales.min() > 10  # the region was really scaled
    else:
        assert not regions, report.summary()
        assert any(row.why in r for r in reasons), reasons


def test_the_table_covers_both_outcomes_and_names_each_refusal():
    assert {r.expect for r in ROWS} == {EQ, REFUSED}
    assert all(r.why for r in ROWS if r.expect == REFUSED)
    assert len({r.name for r in ROWS}) == len(ROWS)


# --- a batch norm module called at two places ---------------------------------------------


class _OneBatchNormTwice(nn.Module):
    """One BatchNorm2d module called behind two convolutions. A ReLU sits between each
    convolution and the BN, and c3 / c4 zero-pad, so neither call can be folded: each is
    carried through its region as a per-channel affine (its mean and shift divided by
    the region's scales). ``second`` is what the second branch applies before the BN:
    ``relu`` puts that call in a region of its own (other scales), ``sigmoid`` in none."""

    def __init__(self, second: str):
        super().__init__()
        self.second = torch.relu if second == "relu" else torch.sigmoid
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.bn = randomize_bn(nn.BatchNorm2d(8))
        self.c3, self.c4 = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        a = self.c3(self.bn(torch.relu(self.c1(x))))
        return a + self.c4(self.bn(self.second(self.c2(x))))


# Before the fix the module's running_mean and bias were overwritten for the first call's
# region, in place: 13.8 dB ("relu") and 8.9 dB ("sigmoid") against the original.
@pytest.mark.parametrize("second", ["relu", "sigmoid"])
def test_a_batch_norm_module_called_twice_is_carried_per_call(second):
    torch.manual_seed(0)
    model = _OneBatchNormTwice(second).eval()
    spread(model.c1, "out", -2.0, 1.0)
    spread(model.c2, "out", 1.0, -2.0)
    x = torch.randn(*SHAPE)
    y0 = forward(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = cle_torch.equalize_model(model, input_shapes=SHAPE)
    assert ("c1",) in [r.sources for r in report.regions]
    assert sqnr_db(y0, forward(new, x)) >= MIN_SQNR_DB
    # each call that needs its own statistics gets its own copy in a GraphModule; the
    # user's model keeps its batch norm
    assert isinstance(new, fx.GraphModule) and new is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sqnr_db(y0, forward(model, x)) == math.inf
