"""Hard-swish, hard-sigmoid and the sigmoid in PyTorch models are opaque activations that
name themselves (attr ``activation``), so the data-free statistics follow them (issue 18);
equalization around them stays exact."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import cle_torch  # noqa: E402
from cle_core import run_graph  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from cle_core._stats import estimate  # noqa: E402
from cle_torch._translate.translator import capture  # noqa: E402


class MobileBlock(nn.Module):
    """conv -> BN -> Hardswish -> conv -> relu -> conv -> hardswish -> SE (hardsigmoid)
    -> conv -> sigmoid."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Conv2d(8, 2, 1)
        with torch.no_grad():  # channel ranges spread over decades: the balance scales
            self.c2.weight.mul_(torch.logspace(-1.5, 1.5, 8).view(8, 1, 1, 1))
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.act(self.bn(self.c1(x)))
        y = F.hardswish(self.c3(F.relu(self.c2(y))))
        y = y * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return torch.sigmoid(self.head(y))


def test_the_activations_name_themselves_and_the_statistics_follow():
    net = MobileBlock().eval()
    cap = capture(net, [(1, 3, 12, 12)])
    named = {n.name: n.attrs.get("activation") for n in cap.ir.nodes if n.op == "opaque"}
    assert sorted(named.values()) == ["hard_sigmoid", "hard_swish", "hard_swish", "sigmoid"]
    x = torch.randn(2, 3, 12, 12)
    ir_out = next(iter(run_graph(cap.ir, {cap.ir.inputs[0].name: x.numpy()}).values()))
    assert sqnr_db(net(x).detach().numpy().astype(np.float64), ir_out) >= 100.0
    stats, _ = estimate(cap.ir)
    assert all(v.name in stats for v in cap.ir.outputs)


@pytest.mark.parametrize("objective", ["balance", "noise"])
def test_equalization_around_them_is_exact(objective):
    net = MobileBlock().eval()
    x = torch.randn(2, 3, 12, 12)
    expected = net(x).detach().numpy().astype(np.float64)
    eq, report = cle_torch.equalize_model(net, input_shapes=[(1, 3, 12, 12)], objective=objective)
    got = eq(x).detach().numpy().astype(np.float64)
    assert sqnr_db(expected, got) >= 100.0, report.summary()
    if objective == "balance":  # the region between the hard-swishes was scaled
        assert any(np.ptp(np.log10(r.scales)) > 0.2 for r in report.regions), report.summary()
