"""The ``torchao-x86`` profile places activation grids where torchao's PT2E
``X86InductorQuantizer`` puts its observers.

For each model, before and after equalization (where a scaled ReLU6 becomes a
``PerChannelClamp`` that the quantizer does not fuse): the layers whose input
``prepare_pt2e`` observes against the layers whose input the profile puts on a grid, and
the number of activation observers against the number of grids the profile places.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("torchao")

import cle_torch  # noqa: E402
from cle_core import Deployment, EqualizeOptions, equalize  # noqa: E402
from cle_core._deployment import _past_identities, get_profile  # noqa: E402
from cle_torch._translate import capture  # noqa: E402
from tests.helpers import torch_models as tm  # noqa: E402

_LAYERS = (
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.linear.default,
)


def _observed(model, x) -> tuple[set[str], int]:
    """The modules of the layers whose data input PT2E observes, and how many activation
    observers it inserts."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model.eval(), (x,)).module()
        prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    layers, count = set(), 0
    for node in prepared.graph.nodes:
        if node.op != "call_module" or "activation_post_process" not in node.target:
            continue
        if node.args[0].op == "get_attr":  # a weight's observer
            continue
        count += 1
        for user in node.users:
            if user.target in _LAYERS and user.args[0] is node:
                layers.add(list(user.meta["nn_module_stack"].values())[-1][0])
    return layers, count


def _profiled(model, shape) -> tuple[set[str], set[str], int]:
    """The layers whose input the profile puts on a grid, the layers whose input has no
    known channel count (no grid can be placed there), and how many grids round."""
    graph = capture(model, input_shapes=shape).ir
    equalize(graph, EqualizeOptions(scale=False, high_bias=False))  # PT2E folds BNs too
    points = get_profile("torchao-x86").points(graph)
    names = {p.value.name for p in points}
    layers = [n for n in graph.nodes if n.is_layer]
    on_grid = {n.name for n in layers if _past_identities(n.inputs[0]).name in names}
    unknown = {n.name for n in layers if _past_identities(n.inputs[0]).channels is None}
    return on_grid, unknown, sum(p.kind != "copy" for p in points)


@pytest.mark.parametrize("name", ["mobilenet_v2", "conv1d", "concat", "unet", "with_silu"])
@pytest.mark.parametrize("equalized", [False, True])
def test_the_profile_places_grids_where_pt2e_observes(name, equalized):
    model, shape = getattr(tm, name)(0)
    model.eval()
    if equalized:
        # The balance scales every region, so every ReLU6 gets per-channel bounds.
        model, _ = cle_torch.equalize_model(
            copy.deepcopy(model), input_shapes=shape, objective="balance"
        )
    observed, count = _observed(model, torch.randn(*shape))
    on_grid, unknown, grids = _profiled(model, shape)
    assert observed - unknown == on_grid
    # A layer reading a value of unknown channels (a Linear after Flatten) may have an
    # observer the profile cannot place; every other observer is one of its grids.
    assert grids <= count <= grids + len(unknown & observed)


def test_no_grid_sits_before_a_per_channel_bound_in_pt2e():
    """onnxruntime rounds a scaled ReLU6's input on the scalar Clip's grid and again after
    the per-channel Min; PT2E rounds only at the next layer's input."""
    model, shape = tm.mobilenet_v2(0)
    model, _ = cle_torch.equalize_model(model.eval(), input_shapes=shape, objective="balance")
    graph = capture(model, input_shapes=shape).ir
    equalize(graph, EqualizeOptions(scale=False, high_bias=False))
    kinds = {p.kind for p in get_profile("torchao-x86").points(graph)}
    assert "pre_bound" not in kinds
    assert "pre_bound" in {p.kind for p in get_profile("onnxruntime").points(graph)}


def test_weights_pt2e_leaves_in_float_carry_no_weight_term():
    """ConvTranspose and a Conv1d not followed by a ReLU stay in float in PT2E."""
    from cle_core._deployment import quantizes_weight

    model, shape = tm.decoder(0)
    graph = capture(model.eval(), input_shapes=shape).ir
    equalize(graph, EqualizeOptions(scale=False, high_bias=False))
    x86, ort = get_profile("torchao-x86"), get_profile("onnxruntime")
    dep = Deployment(quantizer="torchao-x86")
    transposed = [n for n in graph.nodes if n.op == "conv_transpose"]
    assert transposed
    assert not any(quantizes_weight(x86, n, dep) for n in transposed)
    assert all(quantizes_weight(ort, n, Deployment()) for n in transposed)
