"""Small torch models, one per pattern the torch backend must handle.

Every builder returns an eval-mode model with randomised, channel-spread weights and
batch-norm statistics (so that folding, scaling and high-bias absorption all have work
to do) and the input shape it takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomize(model: nn.Module, seed: int = 0, beta_shift: float = 2.0) -> nn.Module:
    """Spread per-output-channel weight ranges over ~3 decades; give batch norms
    non-trivial statistics with positive betas (high biases to absorb)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = m.weight
                spread = 10 ** (torch.rand(w.shape[0], generator=g) * 3 - 1.5)
                w.mul_(spread.view(-1, *([1] * (w.dim() - 1))))
            elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                w = m.weight  # (C_in, C_out / g, *k): spread the output channels
                spread = 10 ** (torch.rand(w.shape[1], generator=g) * 3 - 1.5)
                w.mul_(spread.view(1, -1, *([1] * (w.dim() - 2))))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=g) * 10 ** (torch.rand(c) * 2 - 1))
                    m.bias.copy_(torch.randn(c, generator=g) + beta_shift)
    return model.eval()


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    layers = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, project 1x1, residual when shapes allow."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def mobilenet_v2(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 16, 3, 2),
        InvertedResidual(16, 16, 1, 2),
        InvertedResidual(16, 24, 2, 3),
        InvertedResidual(24, 24, 1, 3),
        conv_bn(24, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    )
    return randomize(model, seed), (2, 3, 32, 32)


class BasicBlock(nn.Module):
    """ResNet: one ReLU module called twice, ``out += identity``, a downsample branch."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(seed=0):
    torch.manual_seed(seed)
    return randomize(ResNet(), seed), (2, 3, 32, 32)


class Bottleneck(nn.Module):
    """ResNet-50: 1x1 reduce, 3x3, 1x1 expand (x4), residual with an optional projection."""

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """The ResNet-50 layout (3, 4, 6, 3 bottlenecks; 25.6 M parameters), for timing."""

    def __init__(self, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                stages.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.maxpool(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50(seed=0):
    torch.manual_seed(seed)
    return randomize(ResNet50(), seed), (1, 3, 224, 224)


class VGG(nn.Module):
    """Conv-BN-ReLU stacks with max pools, ``x.view(x.size(0), -1)``, an MLP head."""

    def __init__(self):
        super().__init__()
        cfg = [16, "M", 32, 32, "M", 48]
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(48 * 2 * 2, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10)
        )

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def vgg(seed=0):
    torch.manual_seed(seed)
    return randomize(VGG(), seed), (2, 3, 16, 16)


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.BatchNorm1d(24),
        nn.ReLU(),
        nn.Linear(24, 5),
    )
    return randomize(model, seed), (8, 12)


def decoder(seed=0):
    """ConvTranspose upsampling, a depthwise ConvTranspose, a final conv."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 16, 3, stride=1, padding=1, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(16, 8, 2, stride=2, output_padding=0),
        nn.ReLU6(),
        nn.Conv2d(8, 3, 1),
    )
    return randomize(model, seed), (2, 8, 5, 5)


class UNet(nn.Module):
    """A U-Net-style encoder-decoder: two downsampling stages, ConvTranspose upsampling,
    skip connections joined with ``torch.cat``, a 1x1 output conv."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.enc1, self.enc2, self.mid = block(3, 8), block(8, 16), block(16, 24)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(24, 16, 2, stride=2)
        self.dec2 = block(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = block(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


def unet(seed=0):
    torch.manual_seed(seed)
    return randomize(UNet(), seed), (2, 3, 16, 16)


def grouped(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1, groups=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, groups=4, bias=False),
        nn.BatchNorm2d(32),
        nn.Hardtanh(-2.0, 3.0),
        nn.Conv2d(32, 8, 1, groups=8),
        nn.PReLU(8),
        nn.Conv2d(8, 6, 1),
    )
    return randomize(model, seed), (2, 4, 8, 8)


class Functional(nn.Module):
    """Modules for the layers, every activation a function call."""

    def __init__(self, bounded: bool = True):
        super().__init__()
        self.bounded = bounded
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c3 = nn.Conv2d(12, 16, 1)
        self.c4 = nn.Conv2d(16, 8, 1)
        self.c5 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        if self.bounded:
            x = F.relu6(self.c2(x))
            x = torch.clamp(self.c3(x), 0.0, 4.0)
            x = F.hardtanh(self.c4(x), -1.0, 2.0)
        else:
            x = F.leaky_relu(self.c2(x), 0.2)
            x = self.c3(x).relu()
            x = F.relu(self.c4(x), inplace=True)
        return self.c5(x)


def functional(seed=0, bounded=True):
    torch.manual_seed(seed)
    return randomize(Functional(bounded), seed), (2, 3, 8, 8)


def conv1d(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU6(),
        nn.Conv1d(16, 16, 3, padding=1, groups=16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 8, 1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return randomize(model, seed), (2, 4, 16)


def conv3d(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.AvgPool3d(2),
        nn.Conv3d(8, 8, 1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU6(),
        nn.ConvTranspose3d(8, 4, 2, stride=2),
        nn.ReLU(),
        nn.Conv3d(4, 2, 1),
    )
    return randomize(model, seed), (2, 2, 6, 6, 6)


def bn_no_affine(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    )
    return randomize(model, seed), (2, 3, 8, 8)


class ReusedActivation(nn.Module):
    """One activation module called at two places (as in EfficientNet-Lite's blocks)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU6):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.act = act()

    def forward(self, x):
        return self.c3(self.act(self.c2(self.act(self.c1(x)))))


def reused_activation(seed=0, act=nn.ReLU6):
    torch.manual_seed(seed)
    return randomize(ReusedActivation(act), seed), (2, 3, 8, 8)


def nested_sequential(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)),
            nn.Sequential(nn.ReLU6()),
        ),
        nn.Sequential(nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())),
        nn.Sequential(nn.Conv2d(16, 4, 1)),
    )
    return randomize(model, seed), (2, 3, 8, 8)


class SharedWeight(nn.Module):
    """``c2`` is called twice (its weight is shared by two layers); ``c4`` shares one
    Parameter object with ``c3`` under another name."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.c4.weight = self.c3.weight
        self.c5 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.c5(F.relu(self.c4(F.relu(self.c3(x)))))


def shared_weight(seed=0):
    torch.manual_seed(seed)
    return randomize(SharedWeight(), seed), (2, 3, 8, 8)


class SamePadConv(nn.Conv2d):
    """EfficientNet's ``Conv2dStaticSamePadding`` pattern: a Conv2d subclass that pads
    and calls ``F.conv2d`` with its own weight and bias."""

    def __init__(self, *args, pass_bias: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.kernel_size[0]
        self.static_padding = nn.ZeroPad2d((k // 2, (k - 1) // 2, k // 2, (k - 1) // 2))
        self.pass_bias = pass_bias

    def forward(self, x):
        bias = self.bias if self.pass_bias else None
        return F.conv2d(
            self.static_padding(x), self.weight, bias, self.stride, 0, self.dilation, self.groups
        )


class CustomConvNet(nn.Module):
    def __init__(self, pass_bias: bool = True):
        super().__init__()
        self.c1 = SamePadConv(3, 8, 3, bias=False, pass_bias=pass_bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.c2 = SamePadConv(8, 8, 3, groups=8, bias=False, pass_bias=pass_bias)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU6()
        self.c3 = SamePadConv(8, 4, 1, bias=False, pass_bias=pass_bias)

    def forward(self, x):
        x = self.act1(self.bn1(self.c1(x)))
        return self.c3(self.act2(self.bn2(self.c2(x))))


class CustomConvSharedAct(nn.Module):
    """Custom convs (with biases) around one ReLU6 module called twice: a GraphModule
    that calls the custom conv modules again."""

    def __init__(self):
        super().__init__()
        self.c1 = SamePadConv(3, 8, 3)
        self.c2 = SamePadConv(8, 8, 3, groups=8)
        self.c3 = SamePadConv(8, 4, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.c3(self.act(self.c2(self.act(self.c1(x)))))


def custom_conv(seed=0, pass_bias=True):
    torch.manual_seed(seed)
    return randomize(CustomConvNet(pass_bias), seed), (2, 3, 9, 9)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.leaky_relu(self.b(x), 0.1)], dim=1)
        return self.head(y)


def concat(seed=0):
    torch.manual_seed(seed)
    return randomize(Concat(), seed), (2, 3, 8, 8)


class WithSiLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.silu(self.c1(x)))))


def with_silu(seed=0):
    torch.manual_seed(seed)
    return randomize(WithSiLU(), seed), (2, 3, 8, 8)


class Untraceable(nn.Module):
    """Data-dependent control flow in a submodule's forward."""

    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.gate = self.Gate()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(self.gate(self.c1(x)))))


class Functions(nn.Module):
    """Every functional pattern the translator knows, on parameters of the model."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.wt = nn.Parameter(torch.randn(4, 2, 2, 2))
        self.lw = nn.Parameter(torch.randn(5, 8))
        self.slope = nn.Parameter(torch.rand(4))

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, padding=1)
        acts = [
            F.relu(y), F.relu6(y), F.hardtanh(y, 0.0, 2.0), F.leaky_relu(y, 0.1),
            torch.clamp(y, 0, 6), y.clamp(min=0), torch.clip(y, 0, 1), y.clamp_min(0),
            torch.clamp_min(y, 0), y.clamp_max(3), torch.relu(y), y.relu(),
            F.prelu(y, self.slope),
        ]  # fmt: skip
        pools = [
            F.max_pool2d(y, 2), F.avg_pool2d(y, 2), F.adaptive_avg_pool2d(y, 1),
            F.pad(y, (1, 1, 1, 1)), F.dropout(y, 0.5, False), y.mean((2, 3), keepdim=True),
            y.contiguous(),
        ]  # fmt: skip
        p = F.adaptive_avg_pool2d(y, 1)
        flats = [torch.flatten(p, 1), p.view(p.size(0), -1), p.reshape(p.shape[0], -1)]
        a, b = acts[0], acts[1]
        joins = [
            torch.cat([a, b], 1), torch.cat((a, b), dim=-3), torch.add(a, b), a + b, a.add(b)
        ]  # fmt: skip
        layers = [
            F.conv_transpose2d(y, self.wt, stride=2, groups=2),
            F.linear(torch.cat([flats[0], y.mean([-1, -2])], 1), self.lw),
        ]
        return acts + pools + flats + joins + layers


def untraceable(seed=0):
    torch.manual_seed(seed)
    return randomize(Untraceable(), seed), (2, 3, 8, 8)


ARCHITECTURES = {
    "mobilenet_v2": mobilenet_v2,
    "resnet": resnet,
    "vgg": vgg,
    "mlp": mlp,
    "decoder": decoder,
    "grouped": grouped,
    "functional": functional,
    "functional_unbounded": lambda seed=0: functional(seed, bounded=False),
    "conv1d": conv1d,
    "conv3d": conv3d,
    "bn_no_affine": bn_no_affine,
    "reused_relu6": reused_activation,
    "reused_relu": lambda seed=0: reused_activation(seed, nn.ReLU),
    "nested_sequential": nested_sequential,
    "shared_weight": shared_weight,
    "custom_conv": custom_conv,
    "custom_conv_no_bias_arg": lambda seed=0: custom_conv(seed, pass_bias=False),
    "custom_conv_shared_act": lambda seed=0: (
        randomize(CustomConvSharedAct(), seed),
        (2, 3, 9, 9),
    ),
    "concat": concat,
    "with_silu": with_silu,
}
