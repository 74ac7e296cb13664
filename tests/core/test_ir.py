"""The IR: construction, wiring, checks, and the reference executor."""

from __future__ import annotations

import numpy as np
import pytest

from cle_core import ExecutionError, Graph, InvalidGraphError, Layout, run_graph


def conv_graph(**attrs):
    g = Graph()
    g.add_input("x", 2)
    rng = np.random.default_rng(0)
    g.add_node(
        "conv",
        ["x"],
        name="c",
        outputs=["y"],
        params={"weight": rng.normal(size=(4, 2, 3, 3)), "bias": None},
        attrs=attrs,
    )
    g.set_outputs(["y"])
    return g


def test_values_know_producer_and_uses():
    g = Graph()
    x = g.add_input("x", 3)
    relu = g.add_node("relu", [x], name="r")
    add = g.add_node("add", [relu.outputs[0], x], name="a")
    assert relu.outputs[0].producer is relu
    assert [n.name for n in x.consumers] == ["r", "a"]
    g.set_outputs([add.outputs[0]])
    g.validate()
    assert add.outputs[0].channels == 3


def test_toposort_orders_nodes_built_out_of_order():
    g = Graph()
    g.add_input("x", 1)
    g.add_node("relu", ["h"], name="second", outputs=["y"])
    g.add_node("identity", ["x"], name="first", outputs=["h"])
    g.set_outputs(["y"])
    g.validate()
    assert [n.name for n in g.nodes] == ["first", "second"]


def test_cycle_is_an_error():
    g = Graph()
    g.add_input("x", 1)
    g.add_node("add", ["x", "b"], name="a", outputs=["a"])
    g.add_node("relu", ["a"], name="b", outputs=["b"])
    g.set_outputs(["b"])
    with pytest.raises(InvalidGraphError, match="cycle"):
        g.validate()


def test_dangling_value_is_an_error():
    g = Graph()
    g.add_input("x", 1)
    g.add_node("add", ["x", "ghost"], name="a", outputs=["y"])
    g.set_outputs(["y"])
    with pytest.raises(InvalidGraphError, match="'ghost'.*no producer"):
        g.validate()


def test_two_producers_is_an_error():
    g = Graph()
    g.add_input("x", 1)
    g.add_node("relu", ["x"], name="a", outputs=["y"])
    with pytest.raises(InvalidGraphError, match="two producers"):
        g.add_node("relu", ["x"], name="b", outputs=["y"])


def test_shape_mismatch_names_the_layer():
    g = Graph()
    g.add_input("x", 3)
    g.add_node(
        "conv",
        ["x"],
        name="conv_a",
        outputs=["y"],
        params={"weight": np.ones((4, 2, 1, 1)), "bias": None},
    )
    g.set_outputs(["y"])
    with pytest.raises(InvalidGraphError, match="conv_a.*2 input channels.*has 3"):
        g.validate()


def test_add_with_different_channels_is_an_error():
    g = Graph()
    g.add_input("x", 3)
    g.add_input("z", 4)
    g.add_node("add", ["x", "z"], name="sum", outputs=["y"])
    g.set_outputs(["y"])
    with pytest.raises(InvalidGraphError, match="sum"):
        g.validate()


def test_bias_and_bn_sizes_checked():
    g = Graph()
    g.add_input("x", 2)
    g.add_node(
        "linear",
        ["x"],
        name="fc",
        outputs=["y"],
        params={"weight": np.ones((3, 2)), "bias": np.ones(4)},
    )
    g.set_outputs(["y"])
    with pytest.raises(InvalidGraphError, match="fc.*bias"):
        g.validate()


def test_unknown_op_is_an_error():
    with pytest.raises(InvalidGraphError, match="unknown op"):
        Graph().add_node("softmax", [], name="s")


def test_bypass_node_rewires_consumers_and_outputs():
    g = Graph()
    g.add_input("x", 1)
    g.add_node("identity", ["x"], name="i", outputs=["h"])
    g.add_node("relu", ["h"], name="r", outputs=["y"])
    g.set_outputs(["h", "y"])
    g.bypass_node(g.node("i"))
    assert g.node("r").inputs[0].name == "x"
    assert [v.name for v in g.outputs] == ["x", "y"]
    assert "h" not in g.values


def test_clone_copies_arrays():
    g = conv_graph()
    c = g.clone()
    c.node("c").params["weight"][...] = 0
    assert np.any(g.node("c").weight != 0)


torch = pytest.importorskip("torch")
F = torch.nn.functional


def test_executor_conv_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 9, 8))
    w = rng.normal(size=(6, 2, 3, 3))
    b = rng.normal(size=6)
    g = Graph()
    g.add_input("x", 4)
    g.add_node(
        "conv",
        ["x"],
        name="c",
        outputs=["y"],
        params={"weight": w, "bias": b},
        attrs={
            "layout": Layout(0, 1, 2),
            "stride": (2, 1),
            "pads": (1, 0, 1, 2),
            "dilation": (1, 2),
        },
    )
    g.set_outputs(["y"])
    ref = F.conv2d(
        F.pad(torch.tensor(x), (0, 2, 1, 1)),
        torch.tensor(w),
        torch.tensor(b),
        stride=(2, 1),
        dilation=(1, 2),
        groups=2,
    ).numpy()
    np.testing.assert_allclose(run_graph(g, {"x": x})["y"], ref, atol=1e-12)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_executor_conv_transpose_matches_torch(nd):
    rng = np.random.default_rng(nd)
    x = rng.normal(size=(2, 4) + (5,) * nd)
    w = rng.normal(size=(4, 3) + (3,) * nd)
    g = Graph()
    g.add_input("x", 4)
    g.add_node(
        "conv_transpose",
        ["x"],
        name="c",
        outputs=["y"],
        params={"weight": w, "bias": None},
        attrs={
            "layout": Layout(1, 0, 2),
            "stride": (2,) * nd,
            "pads": (1,) * (2 * nd),
            "output_padding": (1,) * nd,
        },
    )
    g.set_outputs(["y"])
    fn = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][nd - 1]
    ref = fn(torch.tensor(x), torch.tensor(w), stride=2, padding=1, output_padding=1, groups=2)
    np.testing.assert_allclose(run_graph(g, {"x": x})["y"], ref.numpy(), atol=1e-12)


def test_executor_pools_match_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, 6))
    g = Graph()
    g.add_input("x", 3)
    pool = {"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1)}
    g.add_node("maxpool", ["x"], name="m", outputs=["m"], attrs=pool)
    g.add_node(
        "avgpool", ["x"], name="a", outputs=["a"], attrs={**pool, "count_include_pad": False}
    )
    g.add_node(
        "avgpool", ["x"], name="ai", outputs=["ai"], attrs={**pool, "count_include_pad": True}
    )
    g.add_node("global_avgpool", ["x"], name="g", outputs=["g"])
    g.set_outputs(["m", "a", "ai", "g"])
    out = run_graph(g, {"x": x})
    t = torch.tensor(x)
    np.testing.assert_allclose(out["m"], F.max_pool2d(t, 3, 2, 1).numpy())
    np.testing.assert_allclose(out["a"], F.avg_pool2d(t, 3, 2, 1, count_include_pad=False).numpy())
    np.testing.assert_allclose(out["ai"], F.avg_pool2d(t, 3, 2, 1, count_include_pad=True).numpy())
    np.testing.assert_allclose(out["g"], t.mean(dim=(2, 3), keepdim=True).numpy())


def test_executor_activations_and_structure():
    g = Graph()
    g.add_input("x", 2)
    g.add_node("prelu", ["x"], name="p", outputs=["p"], params={"slope": np.array([0.1, 0.5])})
    g.add_node(
        "clip",
        ["x"],
        name="c",
        outputs=["c"],
        params={"lo": np.array([0.0, -1.0]), "hi": np.array([1.0, np.inf])},
    )
    g.add_node("leaky_relu", ["x"], name="l", outputs=["l"], attrs={"alpha": 0.2})
    g.add_node("concat", ["p", "c"], name="cat", outputs=["cat"])
    g.add_node("flatten", ["cat"], name="f", outputs=["f"])
    g.set_outputs(["f", "l"])
    x = np.array([[[-2.0, 3.0], [-4.0, 5.0]]])  # (1, 2, 2)
    out = run_graph(g, {"x": x})
    np.testing.assert_allclose(out["f"], [[-0.2, 3.0, -2.0, 5.0, 0.0, 1.0, -1.0, 5.0]])
    np.testing.assert_allclose(out["l"], [[[-0.4, 3.0], [-0.8, 5.0]]])


def test_executor_errors_name_the_node():
    g = Graph()
    g.add_input("x", 2)
    g.add_node("opaque", ["x"], name="mystery", outputs=["y"], attrs={"kind": "custom"})
    g.set_outputs(["y"])
    with pytest.raises(ExecutionError, match="mystery"):
        run_graph(g, {"x": np.zeros((1, 2))})
    with pytest.raises(ExecutionError, match="missing feed"):
        run_graph(g, {})
