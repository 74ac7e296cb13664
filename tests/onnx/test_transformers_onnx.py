"""Transformers and ConvNeXt through the ONNX backend (issue 21): every model of
``tests/helpers/transformer_models.py``, exported with the TorchScript exporter
(``dynamo=False``) and with ``dynamo=True`` where it exports, is equalized exactly (FP32
output SQNR >= 90 dB in onnxruntime against the original file) with the noise objective
and with ``objective="balance"`` (which refuses norm regions); the kinds of region found
are the list below, in graph order (a lost pair fails the test), and ``cle inspect``
lists them and the refused ones with their reasons."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import cle_onnx  # noqa: E402
from cle_core import run_graph  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_onnx._backend import _channel_layouts  # noqa: E402
from cle_onnx._calibrate import calibration_stats  # noqa: E402
from tests.helpers.onnx_corpus import _Builder, sqnr_db  # noqa: E402
from tests.helpers.transformer_models import VARIANTS, GQANoRotary, RopeAttention  # noqa: E402
from tests.helpers.transformer_models import llama_hf as tm_llama_hf  # noqa: E402

# The regions (kinds, in graph order) of each model and exporter. What is not there:
# Q -> K where the dynamo exporter's
# scaled_dot_product_attention merges the batch with K's heads, GELU /
# SiLU between layers, the residual stream (it starts at an embedding or a constant
# Add), post-LN norms (BERT: their output feeds the residual too). V -> O behind
# nn.MultiheadAttention's packed in-projection is there: its (T, B, 3, C) split and its
# heads split as (T, B * H, D), the batch merged with the heads and split back before the
# attention (a layout the core follows, the batch being static here). The final norm ->
# head is there, through the class token
# (``x[:, 0]``, a Gather of one position: a ``select``) or the mean over tokens. LLaMA's
# grouped-query V -> O is there through the K / V heads' repetition (Unsqueeze, Expand or
# Tile, Reshape: a repeat the core follows with a channel map), and its Q -> K through the
# rotary embedding (Mul, Slice or Split, Neg, Concat, Mul, Add: one ``rotary``), each
# rotated pair of K channels tied to one scale.
VIT = ["norm", "qk", "attention", "norm"] * 2 + ["norm"]
VIT_NO_QK = ["norm", "attention", "norm"] * 2 + ["norm"]
LLAMA = ["norm", "qk", "attention", "norm", "gated"] * 2 + ["norm"]
EXPECTED = {
    ("vit", "ts"): VIT,
    ("vit", "dynamo"): VIT,
    ("vit_mean_pool", "ts"): VIT,
    ("vit_mean_pool", "dynamo"): VIT,
    ("vit_sdpa", "ts"): VIT,
    ("vit_sdpa", "dynamo"): VIT,
    # q and k cut from one packed projection: no Q -> K (V -> O through it is found)
    ("vit_mha", "ts"): VIT_NO_QK,
    ("vit_mha", "dynamo"): VIT_NO_QK,
    ("llama", "ts"): LLAMA,
    ("llama", "dynamo"): LLAMA,
    ("llama_expand", "ts"): LLAMA,
    ("llama_expand", "dynamo"): LLAMA,
    # the rotary tables computed in forward: folded by the dynamo exporter, by the reader
    # from the TorchScript exporter's MatMul, Concat, Cos, Sin of constants
    ("llama_hf", "ts"): LLAMA,
    ("llama_hf", "dynamo"): LLAMA,
    # nn.RMSNorm: the TorchScript exporter cannot export aten::rms_norm
    ("llama_nn_rmsnorm", "dynamo"): LLAMA,
    # post-LN: V -> O in each layer and the last norm, which feeds the head alone
    # (through the class token)
    ("bert", "ts"): ["attention", "attention", "norm"],
    ("bert", "dynamo"): ["attention", "attention", "norm"],
    ("convnext", "ts"): ["norm"] * 4,
    ("convnext", "dynamo"): ["norm"] * 4,
    # opset 16: no LayerNormalization, the TorchScript exporter writes it out
    ("vit", "ts16"): VIT,
    # opset 23: RMSNormalization
    ("llama_nn_rmsnorm", "dynamo23"): LLAMA,
}

# Refusals ``cle inspect -v`` must give, with (a part of) their reason.
REFUSED = {
    "vit": ["opaque Gelu"],
    "llama": [
        "8 rotated pairs tied: one scale each",  # Q -> K through the rotary embedding
        "opaque Sigmoid",  # SiLU
    ],
    "bert": ["is normalized by", "a normalization does not commute"],
    "convnext": ["is normalized by"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(variant, exporter) -> (path, model input)``, exported once per module;
    ``exporter``: ``ts`` or ``dynamo``, an opset after it where not the default."""
    folder = tmp_path_factory.mktemp("transformers")
    cache = {}

    def get(variant: str, exporter: str):
        key = (variant, exporter)
        if key not in cache:
            model = VARIANTS[variant]()
            x = model.example_input(2)
            path = folder / f"{variant}_{exporter}.onnx"
            dynamo = exporter.startswith("dynamo")
            opset = exporter.removeprefix("dynamo" if dynamo else "ts")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    dynamo=dynamo,
                    opset_version=int(opset) if opset else None,
                    input_names=["x"],
                    output_names=["y"],
                )
            cache[key] = (path, x.numpy())
        return cache[key]

    return get


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def always_scale(monkeypatch):
    """The noise objective scales every region it finds, however small its estimated
    gain (on these untrained models it is often below the 1 dB it asks for), so that
    the write-back of every region is exercised."""
    from cle_core._objectives import noise

    monkeypatch.setattr(noise, "MIN_GAIN_DB", float("-inf"))


@pytest.mark.parametrize(
    ("variant", "exporter"), list(EXPECTED), ids=[f"{v}-{e}" for v, e in EXPECTED]
)
def test_equalized_exactly_with_the_regions_expected(exported, always_scale, variant, exporter):
    path, x = exported(variant, exporter)
    expected = _run(onnx.load(str(path)), x)
    for objective in ("noise", "balance"):
        eq, report = cle_onnx.equalize_model(str(path), objective=objective)
        assert sqnr_db(expected, _run(eq, x)) >= 90, report.summary(verbose=True)
        kinds = [r.kind for r in report.regions]
        assert kinds == EXPECTED[variant, exporter], report.summary(verbose=True)
        spread = [float(np.max(np.abs(np.log10(r.scales)))) for r in report.regions]
        if objective == "noise":
            # (Q -> K moves less on these untrained models, whose q and k rows are spread
            # alike; its estimated noise must still fall)
            assert all(
                s > (0.01 if k == "qk" else 0.05) for s, k in zip(spread, kinds, strict=True)
            ), (
                spread,
                report.summary(verbose=True),
            )
            qk = [r for r in report.regions if r.kind == "qk"]
            if variant.startswith("llama"):
                # A region's terms at the end count its neighbours' moves too: LLaMA's
                # first Q -> K shares wq's and wk's grids with the attention norm's
                # region, whose scales raise them (0.3 %); each step lowers the total.
                assert report.noise.after < report.noise.before
            else:
                assert all(r.noise_after < r.noise_before for r in qk), report.summary(True)
        else:
            # the balance has no range for a norm's affine: it leaves those regions
            assert all(s == 0 for s, k in zip(spread, kinds, strict=True) if k == "norm")
            refusals = [s.reason for s in report.skipped if "norm's affine" in s.reason]
            assert len(refusals) == kinds.count("norm")


@pytest.mark.parametrize("variant", list(REFUSED))
def test_inspect_lists_the_regions_and_the_refusals(exported, variant, capsys):
    path, _ = exported(variant, "ts")
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  #\d+ ([\w-]+), \d+ channels:", out, flags=re.M)
    assert listed == EXPECTED[variant, "ts"], out
    for reason in REFUSED[variant]:
        assert reason in out, out


def test_calibrated_statistics_on_channel_last_values(exported, tmp_path):
    """``calibration=``: the statistics of token tensors ``(B, T, C)`` are per channel
    of the last axis (a wrong axis shows as a channel count the core refuses), and the
    result stays exact."""
    path, x = exported("vit", "ts")
    rng = np.random.default_rng(1)
    calibration = rng.standard_normal((8, *x.shape[1:])).astype(np.float32)
    model = onnx.load(str(path))
    layouts = _channel_layouts(None, model)
    stats = calibration_stats(model, calibration, layouts)
    graph, _ = cle_onnx._translate.to_ir(model)
    graph.validate()
    tokens = [v for v in graph.values.values() if v.channel_axes == (2,) and v.name in stats]
    assert tokens, "no channel-last value measured"
    for v in tokens:
        # 17 tokens, 32 or 64 channels: an axis taken for another shows
        assert stats[v.name].channels == v.channels in (32, 64), v.name
    eq, report = cle_onnx.equalize_model(str(path), calibration=calibration)
    assert [r.kind for r in report.regions] == EXPECTED["vit", "ts"]
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90
    # the same from the command line
    calib, out = tmp_path / "calibration.npy", tmp_path / "out.onnx"
    np.save(calib, calibration)
    args = ["equalize", str(path), "-o", str(out), "--calibration", str(calib), "--quiet"]
    assert main(args) == 0
    assert sqnr_db(_run(model, x), _run(onnx.load(str(out)), x)) >= 90


# --- the translation of norms, on small graphs ---------------------------------------


def _equalize_exactly(model, x):
    """Equalize, check that every region was scaled and that the outputs agree to 90 dB;
    the equalized model and the report."""
    eq, report = cle_onnx.equalize_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    before = session.run(None, {"x": x})
    after = ort.InferenceSession(eq.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, a, b in zip(names, before, after.run(names, {"x": x}), strict=True):
        assert sqnr_db(a, b) >= 90, (name, report.summary(verbose=True))
    for r in report.regions:  # scaled: the write-back is exercised
        assert np.max(np.abs(np.log10(r.scales))) > 0.05, report.summary(verbose=True)
    return eq, report


def _tokens(b: _Builder, x: str, c: int, out: int) -> str:
    """A Linear on the last axis, as exporters write it: MatMul + Add(bias)."""
    h = b.node("MatMul", [x, b.init(b.spread((c, out), axis=1))])
    return b.node("Add", [h, b.init(b.normal(out), "bias")])


def _affine(b: _Builder, c: int) -> tuple[str, str]:
    gamma = b.init(10.0 ** b.rng.uniform(-1, 1, c), "gamma")
    return gamma, b.init(b.normal(c), "beta")


@pytest.mark.parametrize(("opset", "groups"), [(21, 2), (18, 8)])
def test_group_normalization_is_a_source(always_scale, opset, groups):
    """Opset 21: a scale per channel; opset 18: one per group, per channel only when
    every group is one channel."""
    b = _Builder(3, opset)
    h = b.conv("x", 4, 8, 3, pad=1)
    gamma, beta = _affine(b, 8)
    h = b.node("GroupNormalization", [h, gamma, beta], num_groups=groups, epsilon=1e-5)
    b.conv(h, 8, 4, 1)
    model = b.untyped_model((2, 4, 6, 6))
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    _, report = _equalize_exactly(model, x)
    assert [r.kind for r in report.regions] == ["norm"], report.summary(verbose=True)


def test_group_normalization_with_a_scale_per_group_is_refused():
    b = _Builder(3, 18)
    h = b.conv("x", 4, 8, 3, pad=1)
    h = b.node("GroupNormalization", [h, *_affine(b, 2)], num_groups=2)
    b.conv(h, 8, 4, 1)
    model = b.untyped_model((2, 4, 6, 6))
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    _, report = _equalize_exactly(model, x)
    assert not any(r.kind == "norm" for r in report.regions)
    reasons = [s.reason for s in report.skipped if s.stage == "translate"]
    assert any("one value per group, not per channel" in r for r in reasons), reasons


def test_a_gamma_read_elsewhere_too_is_copied(always_scale):
    """The LayerNormalization gets its own divided gamma; the other reader keeps the
    initializer as it was."""
    b = _Builder(4, 17)
    gamma, beta = _affine(b, 8)
    y = b.node("LayerNormalization", ["x", gamma, beta], axis=-1)
    y = _tokens(b, y, 8, 6)
    other = b.node("Mul", ["x", gamma])
    model = b.untyped_model((2, 5, 8), [y, other])
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    eq, report = _equalize_exactly(model, x)
    assert [r.kind for r in report.regions] == ["norm"]
    (ln,) = [n for n in eq.graph.node if n.op_type == "LayerNormalization"]
    (mul,) = [n for n in eq.graph.node if n.op_type == "Mul"]
    assert mul.input[1] == gamma and ln.input[1] != gamma
    inits = {t.name: t for t in eq.graph.initializer}
    original = {t.name: t for t in model.graph.initializer}
    assert inits[gamma] == original[gamma]


def test_layer_normalization_over_several_axes_is_refused():
    b = _Builder(5, 17)
    h = b.conv("x", 4, 8, 3, pad=1)
    gamma = b.init(b.rng.uniform(0.5, 2, (8, 6, 6)), "gamma")
    h = b.node("LayerNormalization", [h, gamma], axis=1)
    b.conv(h, 8, 4, 1)
    model = b.untyped_model((2, 4, 6, 6))
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    _, report = _equalize_exactly(model, x)
    reasons = [s.reason for s in report.skipped if s.stage == "translate"]
    assert any("normalizes axes 1..3: its scale is per element" in r for r in reasons), reasons


def _decomposed_layer_norm(b: _Builder, x: str, gamma: str, beta: str, axis: int):
    axes = b.ints([axis], "axes")
    mean = b.node("ReduceMean", [x, axes], keepdims=1)
    d = b.node("Sub", [x, mean])
    var = b.node("ReduceMean", [b.node("Pow", [d, b.init(np.array(2.0), "two")]), axes])
    root = b.node("Sqrt", [b.node("Add", [var, b.init(np.array(1e-5), "eps")])])
    return d, b.node("Add", [b.node("Mul", [b.node("Div", [d, root]), gamma]), beta])


@pytest.mark.parametrize("leak", [False, True])
def test_a_decomposed_layer_norm_is_one_norm_unless_an_inner_value_leaks(always_scale, leak):
    """Channels first (ConvNeXt's LayerNorm2d): gamma and beta (C, 1, 1), written back
    in that shape. Where the centred value is also a graph output, the pattern is not
    matched (its nodes stay as they are, opaque)."""
    b = _Builder(6, 18)
    h = b.conv("x", 4, 8, 3, pad=1)
    gamma = b.init(10.0 ** b.rng.uniform(-1, 1, (8, 1, 1)), "gamma")
    beta = b.init(b.normal(8, 1, 1), "beta")
    d, y = _decomposed_layer_norm(b, h, gamma, beta, 1)
    out = b.conv(y, 8, 4, 1)
    model = b.untyped_model((2, 4, 6, 6), [out, d] if leak else [out])
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    eq, report = _equalize_exactly(model, x)
    assert [r.kind for r in report.regions] == ([] if leak else ["norm"])
    if not leak:
        (mul,) = [n for n in eq.graph.node if n.op_type == "Mul"]
        (new,) = [t for t in eq.graph.initializer if t.name in mul.input]
        assert tuple(new.dims) == (8, 1, 1)


def _rms_norm(b: _Builder, x: str, weight: str, form: str) -> str:
    """LLaMA's RMSNorm as the exporters write it: ``x * (1 / sqrt(...))`` (TorchScript),
    ``x * reciprocal(sqrt(...))`` (dynamo), or ``x / sqrt(...)``."""
    squares = b.node("Pow", [x, b.init(np.array(2.0), "two")])
    mean = b.node("ReduceMean", [squares, b.ints([-1], "axes")], keepdims=1)
    root = b.node("Sqrt", [b.node("Add", [mean, b.init(np.array(1e-6), "eps")])])
    if form == "div":
        normalized = b.node("Div", [x, root])
    else:
        inverse = (
            b.node("Reciprocal", [root])
            if form == "reciprocal"
            else b.node("Div", [b.init(np.array(1.0), "one"), root])
        )
        normalized = b.node("Mul", [x, inverse])
    return b.node("Mul", [weight, normalized])


@pytest.mark.parametrize("form", ["one_over", "reciprocal", "div"])
def test_the_core_runs_the_translated_graph_as_onnxruntime_does(form):
    """Tokens ``(B, T, C)`` through an RMSNorm written out, a LayerNormalization, Linears,
    attention-style MatMul of activations and a Softmax: the IR the reader makes, run by
    the core's executor, computes what onnxruntime does (norm kinds, axes and eps,
    channel axes, the Softmax's function)."""
    b = _Builder(7, 18)
    h = _rms_norm(b, "x", b.init(10.0 ** b.rng.uniform(-1, 1, 8), "weight"), form)
    q = _tokens(b, h, 8, 8)
    gamma, beta = _affine(b, 8)
    k = _tokens(b, b.node("LayerNormalization", [h, gamma, beta], axis=-1, epsilon=1e-3), 8, 8)
    scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 2, 1])])
    y = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), k])
    model = b.untyped_model((2, 5, 8), [y])
    graph, _ = cle_onnx._translate.to_ir(model)
    graph.validate()
    assert sorted(n.attrs["kind"] for n in graph.nodes if n.op == "norm") == ["layer", "rms"]
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    got = run_graph(graph, {"x": x})[y]
    want = _run(model, x)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_per_channel_clip_bounds_on_tokens_lie_on_the_last_axis():
    """Linear -> ReLU6 -> Linear on ``(B, T, C)``: the balanced scales make the bound per
    channel, written as a constant of shape ``(1, 1, C)`` (on axis 1 it would not even
    broadcast: T != C)."""
    b = _Builder(8, 13)
    h = _tokens(b, "x", 6, 12)
    h = b.node("Clip", [h, b.init(np.array(0.0), "lo"), b.init(np.array(6.0), "hi")])
    _tokens(b, h, 12, 4)
    model = b.untyped_model((2, 5, 6))
    x = (np.random.default_rng(0).standard_normal((2, 5, 6)) * 3).astype(np.float32)
    eq, report = cle_onnx.equalize_model(model, objective="balance")
    assert [r.kind for r in report.regions] == ["pair"]
    (bound,) = [n for n in eq.graph.node if n.op_type == "Min"]
    shape = [tuple(t.dims) for t in eq.graph.initializer if t.name == bound.input[1]]
    assert shape == [(1, 1, 12)]
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90


@pytest.mark.parametrize("opset", ["", "16"])  # LayerNormalization, and the written-out form
def test_nan_in_a_norm_s_scale_is_one_error_naming_it_and_the_input_is_untouched(exported, opset):
    from cle_core import NonFiniteError

    path, _ = exported("vit", "ts" + opset)
    model = onnx.load(path)
    name = next(t.name for t in model.graph.initializer if "norm1.weight" in t.name)
    for t in model.graph.initializer:
        if t.name == name:
            a = onnx.numpy_helper.to_array(t).copy()
            a[2] = np.nan
            t.CopyFrom(onnx.numpy_helper.from_array(a, name))
    before = model.SerializeToString()
    with pytest.raises(NonFiniteError, match=r"norm1.*\(norm\): NaN in gamma"):
        cle_onnx.equalize_model(model)
    assert model.SerializeToString() == before


# --- positions selected: the class token -------------------------------------------


def _class_token_model(pick: str, axis: int = 1, constant_index: bool = True):
    """Tokens ``(2, 5, 8)`` -> LayerNormalization -> positions of ``axis`` -> a head.
    ``pick``: ``gather`` (``x[:, 0]``, a scalar index: Gemm head), ``gather_list``
    (indices ``[4, 0]``), ``slice`` (``x[:, 1::2]``), ``slice_all`` (``x[:, 1:]`` with the
    exporters' INT64_MAX end)."""
    b = _Builder(9, 17)
    gamma, beta = _affine(b, 8)
    h = b.node("LayerNormalization", ["x", gamma, beta], axis=-1)
    if pick.startswith("gather"):
        index = np.array(0) if pick == "gather" else np.array([4, 0])
        if constant_index:
            where = b.ints(index, "index")
        else:  # a position computed from the data (a scalar in 0..4)
            where = b.node("ReduceMin", [b.node("ArgMax", ["x"], axis=1, keepdims=0)], keepdims=0)
        picked = b.node("Gather", [h, where], axis=axis)
    else:
        step, end = (2, 5) if pick == "slice" else (1, np.iinfo(np.int64).max)
        args = [b.ints([1], "starts"), b.ints([end], "ends"), b.ints([axis], "axes")]
        picked = b.node("Slice", [h, *args, b.ints([step], "steps")])
    if pick == "gather" and axis == 1:
        w = b.init(b.spread((3, 8), axis=0))
        head = b.node("Gemm", [picked, w, b.init(b.normal(3), "bias")], transB=1)
    else:
        index = {"gather": 0, "gather_list": [4, 0], "slice": slice(1, 5, 2)}.get(pick)
        index = slice(1, None) if index is None else index
        last = np.zeros((2, 5, 8))[(slice(None),) * axis + (index,)].shape[-1]
        head = _tokens(b, picked, last, 3)
    return b.untyped_model((2, 5, 8), [head])


@pytest.mark.parametrize("pick", ["gather", "gather_list", "slice", "slice_all"])
def test_the_class_token_carries_the_final_norm_to_the_head(always_scale, pick):
    """``x[:, 0]`` (a Gather of one position), a list of positions, a slice of them: the
    norm -> head pair is found through it and equalized exactly."""
    model = _class_token_model(pick)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    _, report = _equalize_exactly(model, x)
    assert [r.kind for r in report.regions] == ["norm"], report.summary(verbose=True)
    # the core's executor selects what onnxruntime does
    graph, _ = cle_onnx._translate.to_ir(model)
    graph.validate()
    assert [n.op for n in graph.nodes] == ["norm", "select", "linear"]
    got = run_graph(graph, {"x": x})[model.graph.output[0].name]
    want = _run(model, x)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.mark.parametrize(
    ("pick", "axis", "constant", "why"),
    [
        # some channels: followed, but the others have no reader
        ("gather", 2, True, "it selects one channel (axis 2)"),
        ("slice", 2, True, "has no sink layer"),
        ("gather", 0, True, "selects along the batch axis"),
        ("gather", 1, False, "its indices are not constant"),
    ],
)
def test_a_selection_of_channels_or_by_computed_positions_is_refused(pick, axis, constant, why):
    model = _class_token_model(pick, axis, constant)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    eq, report = cle_onnx.equalize_model(model)
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90  # a valid model, left as it was
    assert not report.regions
    assert any(why in s.reason for s in report.skipped), report.summary(verbose=True)


def test_calibrated_bert_an_opaque_residual_branch_measured_along_the_tokens():
    """nn.MultiheadAttention's output reaches the residual Add through ops the IR keeps
    opaque (channels unknown: measured along axis 1, the tokens); the Add's estimate
    does not sum those statistics with the channels' (it raised a broadcast error), and
    the final norm -> head is found and equalized exactly."""
    torch_model = VARIANTS["bert"]()
    x = torch_model.example_input(2)
    buffer = io.BytesIO()  # with a dynamic batch, as the benchmark exports it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch_model,
            (x,),
            buffer,
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "N"}},
        )
    model, x = onnx.load_from_string(buffer.getvalue()), x.numpy()
    calibration = torch_model.example_input(8, seed=1).numpy()
    eq, report = cle_onnx.equalize_model(model, calibration=calibration)
    assert [r.kind for r in report.regions] == EXPECTED["bert", "ts"]
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90


# --- grouped-query attention ----------------------------------------------------------

#: exporter -> (V's layer, O's layer) of LLaMA's first block, as each names them.
_LLAMA_V_O = {
    "ts": ("/blocks.0/attn/wv/MatMul", "/blocks.0/attn/wo/MatMul"),
    "dynamo": ("node_linear_2", "node_linear_3"),
}


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
@pytest.mark.parametrize("variant", ["llama", "llama_expand"])
def test_inspect_lists_grouped_query_v_to_o(exported, variant, exporter, capsys):
    """The K / V heads repeated (Unsqueeze, then Tile or Expand, then Reshape, as each
    exporter writes ``repeat_interleave`` and ``expand``): V -> O over V's 16 channels
    (2 K / V heads of 8), each read by two heads' O columns; Q -> K over K's 16 channels
    (its rotary embedding before its repeat), the rotated pairs tied."""
    path, _ = exported(variant, exporter)
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    v, o = _LLAMA_V_O[exporter]
    assert re.search(
        rf"^  #\d+ attention, 16 channels: {re.escape(v)} -> {re.escape(o)}$", out, re.M
    )
    assert len(re.findall(r"^  #\d+ qk, 16 channels: .* \(8 rotated pairs tied", out, re.M)) == 2


@pytest.mark.parametrize("dynamo", [False, True])
def test_a_repeated_k_is_paired_with_the_query_heads_that_read_it(always_scale, dynamo):
    """Grouped-query attention without rotary, both exporters: Q -> K over K's 8
    channels (each met by two query heads) and V -> O over V's 8, exact."""
    from tests.helpers.transformer_models import spread_channels

    torch.manual_seed(0)
    model = spread_channels(GQANoRotary()).eval()
    x = torch.randn(2, 5, 16)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            buffer.write(
                torch.onnx.export(
                    model, (x,), dynamo=True, input_names=["x"]
                ).model_proto.SerializeToString()
            )
        else:
            torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    proto = onnx.load_from_string(buffer.getvalue())
    eq, report = cle_onnx.equalize_model(proto)
    assert sqnr_db(_run(proto, x.numpy()), _run(eq, x.numpy())) >= 90
    assert [(r.kind, r.channels) for r in report.regions] == [("qk", 8), ("attention", 8)]
    assert all(np.ptp(np.log(r.scales)) > 0.01 for r in report.regions)


# --- q / k / v cut from one packed projection ---------------------------------------------


class _GPTBlock(torch.nn.Module):
    """GPT-2's attention: a LayerNorm, one packed ``c_attn`` projection split into q | k |
    v along its last axis, heads, ``c_proj``, a residual."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        nn = torch.nn
        self.heads, self.dim = heads, dim
        self.ln = nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(self.dim, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))


def _export(model, x, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, input_names=["x"]).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, True])
def test_v_cut_from_a_packed_projection_is_equalized_q_and_k_kept(
    always_scale, dynamo, tmp_path, capsys
):
    """The Split of ``c_attn``'s output along its last axis: each part keeps its channels
    (a ``select`` the core follows with a channel map); V -> O is equalized, q's and k's
    rows of ``c_attn`` keep their values (they meet in Q K^T), exactly; ``cle inspect``
    lists the pair and why q and k are kept."""
    from tests.helpers.transformer_models import spread_channels

    torch.manual_seed(0)
    model = spread_channels(_GPTBlock()).eval()
    x = torch.randn(2, 5, 16)
    proto = _export(model, x, dynamo)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    eq, report = cle_onnx.equalize_model(proto)
    assert sqnr_db(_run(proto, x.numpy()), _run(eq, x.numpy())) >= 90
    attention = [r for r in report.regions if r.kind == "attention"]
    assert [r.channels for r in attention] == [48], report.summary(verbose=True)
    s = attention[0].scales
    assert np.all(s[:32] == 1) and np.any(s[32:] != 1)
    after = {t.name: onnx.numpy_helper.to_array(t) for t in eq.graph.initializer}
    (packed,) = [n for n, w in weights.items() if w.shape == (16, 48)]  # MatMul: (in, out)
    # q's and k's outputs unscaled: only the LayerNorm's scales on c_attn's inputs
    (s_in,) = [r.scales for r in report.regions if r.kind == "norm"]
    want = weights[packed] * s_in[:, None]
    np.testing.assert_allclose(after[packed][:, :32], want[:, :32], rtol=1e-6)
    assert not np.allclose(after[packed][:, 32:], want[:, 32:], rtol=1e-3)
    path = tmp_path / "gpt.onnx"
    onnx.save(proto, str(path))
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  #\d+ attention, 48 channels: ", out, re.M), out
    assert "(channels 0-15 kept at scale 1)" in out and "(channels 16-31 kept at scale 1)" in out
    assert "the MatMul sums over the channels" in out


# --- nn.MultiheadAttention: the batch merged with the heads ---------------------------------


class _MHABlock(torch.nn.Module):
    """``nn.MultiheadAttention`` alone (packed in-projection, self-attention)."""

    def __init__(self, batch_first: bool, dim=16, heads=4):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _export_mha(batch_first: bool, batch: int, dynamo: bool, dynamic: bool):
    from tests.helpers.transformer_models import spread_channels

    torch.manual_seed(0)
    model = spread_channels(_MHABlock(batch_first)).eval()
    axis = 0 if batch_first else 1
    x = torch.randn(batch, 5, 16) if batch_first else torch.randn(5, batch, 16)
    kw = {}
    if dynamic:
        if dynamo:
            kw["dynamic_shapes"] = ({axis: torch.export.Dim("b")},)
        else:
            kw["dynamic_axes"] = {"x": {axis: "b"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], **kw)
            return proto.model_proto, x.numpy()
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], **kw)
        return onnx.load_from_string(buffer.getvalue()), x.numpy()


@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_v_to_o_through_the_batch_merged_with_the_heads(
    always_scale, batch_first, batch, dynamo
):
    """Both exporters split V's heads as ``(T, B * H, D)`` (the batch merged with the
    heads), transpose, split the batch back, and merge the heads as ``(T * B, C)`` or
    ``(T, B, C)`` before the out projection; the TorchScript one cuts q / k / v from
    ``(T, B, 3, C)``, whose shape it computes with ``Mod``. V -> O is found over the
    packed projection's 48 channels (q's and k's kept at scale 1) and is exact."""
    proto, x = _export_mha(batch_first, batch, dynamo, dynamic=False)
    eq, report = cle_onnx.equalize_model(proto)
    summary = report.summary(verbose=True)
    assert [(r.kind, r.channels) for r in report.regions] == [("attention", 48)], summary
    s = report.regions[0].scales
    assert np.all(s[:32] == 1) and np.any(np.abs(np.log10(s[32:])) > 0.05)
    assert sqnr_db(_run(proto, x), _run(eq, x)) >= 90


@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_with_a_dynamic_batch(always_scale, batch_first, dynamo):
    """With the batch dynamic, ``(T, B * H, D)`` has one unknown size, which the number
    of elements ties to the input's: followed all the same (the TorchScript exporter's
    ``B * H``, computed with Shape and Mul, is taught to shape inference as -1), and
    exact for another batch size than the exported one."""
    proto, x = _export_mha(batch_first, 2, dynamo, dynamic=True)
    eq, report = cle_onnx.equalize_model(proto)
    summary = report.summary(verbose=True)
    assert [(r.kind, r.channels) for r in report.regions] == [("attention", 48)], summary
    other = np.random.default_rng(1).standard_normal((3, 5, 16) if batch_first else (5, 3, 16))
    for inputs in (x, other.astype(np.float32)):
        assert sqnr_db(_run(proto, inputs), _run(eq, inputs)) >= 90


@pytest.mark.parametrize("variant", ["llama", "llama_expand"])
def test_llama_torchscript_export_with_a_dynamic_batch_finds_every_region(always_scale, variant):
    """The TorchScript exporter merges LLaMA's heads back with ``reshape(b, t, -1)``,
    ``b`` read with Shape from the block's input: after the K / V heads' Tile, shape
    inference no longer ties the attention's batch to it. The O projection reads
    exactly the features the Reshape gives with the same batch, so it is that batch
    (with another the model could not run): the regions are the dynamo export's, and
    exact at another batch size than the exported one."""
    model = VARIANTS[variant]()
    x = model.example_input(2)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "N"}}
        )
    proto = onnx.load_from_string(buffer.getvalue())
    eq, report = cle_onnx.equalize_model(proto)
    assert [r.kind for r in report.regions] == LLAMA, report.summary(verbose=True)
    for inputs in (x.numpy(), model.example_input(3, seed=1).numpy()):
        assert sqnr_db(_run(proto, inputs), _run(eq, inputs)) >= 90


@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
def test_inspect_lists_bert_v_to_o_with_a_dynamic_batch(dynamo, tmp_path, capsys):
    """BERT exported as the benchmark exports it (a dynamic batch): ``cle inspect`` lists
    V -> O of every layer, through the packed in-projection, and the last norm."""
    model = VARIANTS["bert"]()
    x = model.example_input(2)
    path = tmp_path / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                input_names=["x"],
                dynamic_shapes=({0: torch.export.Dim("N")},),
            )
            onnx.save(program.model_proto, str(path))
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=["x"],
                dynamic_axes={"x": {0: "N"}},
            )
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  #\d+ ([\w-]+), (\d+) channels:", out, flags=re.M)
    assert listed == [("attention", "96"), ("attention", "96"), ("norm", "32")], out


# --- Q -> K ----------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_inspect_lists_q_to_k_and_the_rotary_ties(exported, exporter, capsys):
    """The ViT's two Q -> K pairs (K's projection -> q's, 32 channels), and LLaMA's
    through its rotary embedding (K's 16 channels, 8 rotated pairs tied)."""
    path, _ = exported("vit", exporter)
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    pairs = re.findall(r"^  #\d+ qk, 32 channels: (\S+) -> (\S+)$", out, re.M)
    assert len(pairs) == 2, out
    if exporter == "ts":
        assert pairs == [
            (f"/blocks.{b}/attn/k/MatMul", f"/blocks.{b}/attn/q/MatMul") for b in (0, 1)
        ]
    path, _ = exported("llama", exporter)
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    pairs = re.findall(
        r"^  #\d+ qk, 16 channels: (\S+) -> (\S+) \(8 rotated pairs tied: one scale each\)$",
        out,
        re.M,
    )
    assert len(pairs) == 2, out
    if exporter == "ts":
        assert pairs == [
            (f"/blocks.{b}/attn/wk/MatMul", f"/blocks.{b}/attn/wq/MatMul") for b in (0, 1)
        ]


def _export_rope(form: str, dynamo: bool, folder):
    """``RopeAttention(form)`` (tests.helpers.transformer_models) exported to a file in
    ``folder``, and its example input."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    path = folder / f"rope_{form}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            RopeAttention(form).eval(), (x,), str(path), dynamo=dynamo, input_names=["x"]
        )
    return path, x.numpy()


@pytest.mark.parametrize("variant", ["vit", "llama", "llama_hf", "rope_table"])
def test_the_input_file_and_proto_are_unchanged(exported, always_scale, variant, tmp_path):
    if variant == "rope_table":  # q and k times a table, not a rotary: Q -> K refused
        path, x = _export_rope("table", False, tmp_path)
    else:
        path, x = exported(variant, "ts")
    before = path.read_bytes()
    eq, report = cle_onnx.equalize_model(str(path))
    assert ("qk" in [r.kind for r in report.regions]) == (variant != "rope_table")
    if variant == "rope_table":
        reasons = " ".join(s.reason for s in report.skipped if "Q K^T" in s.candidate)
        assert "multiplies by a constant that is not per channel" in reasons, reasons
    assert path.read_bytes() == before
    proto = onnx.load(str(path))
    serialized = proto.SerializeToString()
    eq2, _ = cle_onnx.equalize_model(proto)
    assert proto.SerializeToString() == serialized
    assert sqnr_db(_run(proto, x), _run(eq2, x)) >= 90


@pytest.mark.parametrize(
    ("variant", "exporter"),
    [
        ("vit", "ts"),
        ("vit", "dynamo"),
        ("vit_sdpa", "ts"),
        ("llama", "ts"),
        ("llama", "dynamo"),
        ("llama_expand", "dynamo"),
        ("llama_hf", "ts"),
        ("llama_hf", "dynamo"),
    ],
)
def test_q_to_k_is_exact_under_random_scales(exported, variant, exporter):
    """Every region, Q -> K included, scaled over two decades (a test objective):
    onnxruntime computes what it computed. LLaMA's Q -> K through the rotary embedding:
    each rotated pair (d, d + 4) of K's 2 heads of 8 takes one scale (the geometric mean
    of the two drawn: less spread)."""
    from tests.helpers.ir_transformers import random_scales_objective

    path, x = exported(variant, exporter)
    expected = _run(onnx.load(str(path)), x)
    eq, report = cle_onnx.equalize_model(str(path), objective=random_scales_objective())
    qk = [r for r in report.regions if r.kind == "qk"]
    spread = 5 if variant.startswith("llama") else 10
    assert len(qk) == 2 and all(r.scales.max() / r.scales.min() > spread for r in qk)
    if variant.startswith("llama"):
        assert all(
            r.tied == 8 and np.array_equal(r.scales, r.scales[np.arange(16) ^ 4]) for r in qk
        )
    assert sqnr_db(expected, _run(eq, x)) >= 90


@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
def test_statistics_of_the_batch_merged_with_the_heads_are_per_channel(dynamo):
    """Calibration on an nn.MultiheadAttention export with a dynamic batch: every value
    whose batch is merged with the heads ``(T, B * H, D)`` is measured per channel of
    the H * D (not per B * H * D), in batches of 4 and a last one of 3."""
    proto, x = _export_mha(True, 2, dynamo, dynamic=True)
    calibration = np.random.default_rng(2).standard_normal((7, 5, 16)).astype(np.float32)
    layouts = _channel_layouts(None, proto)
    merged = {n: lay for n, lay in layouts.items() if lay["channel_outer"] is not None}
    assert merged, "no value with the batch merged with the heads"
    stats = calibration_stats(proto, calibration, layouts)
    for name, lay in merged.items():
        assert name in stats and stats[name].channels == lay["channels"] == 16, name


# --- rotary embeddings ---------------------------------------------------------------


def _rotary_attention(interleaved=0, positions=False, three_d=False, seed=0):
    """Opset 23: q, k, v projections of ``x`` (2, 5, 16), heads (2 of 8), opset 23's
    RotaryEmbedding on q and k (caches ``(B, S, 4)``, or ``(10, 4)`` gathered by
    constant position ids; ``three_d``: on the heads merged, ``(B, S, 16)``), attention,
    the out projection."""
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    b, t, c, heads, d = 2, 5, 16, 2, 8
    inits, nodes = [], []

    def init(name, array):
        inits.append(nh.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, **attrs):
        out = f"{op.lower()}{len(nodes)}"
        nodes.append(h.make_node(op, inputs, [out], **attrs))
        return out

    def weight(name):  # rows over two decades: something to equalize
        w = rng.standard_normal((c, c)) * 10.0 ** rng.uniform(-1, 1, (1, c))
        return init(name, w.astype(np.float32))

    init("split", np.array([b, t, heads, d], np.int64))
    init("merge", np.array([b, t, c], np.int64))
    shape = (10, d // 2) if positions else (b, t, d // 2)
    init("cos", rng.standard_normal(shape).astype(np.float32))
    init("sin", rng.standard_normal(shape).astype(np.float32))
    rope_inputs = ["cos", "sin"] + (
        [init("pos", rng.integers(0, 10, (b, t)).astype(np.int64))] if positions else []
    )
    sides = []
    for p in "qkv":
        y = node("MatMul", ["x", weight(f"w{p}")])
        if p != "v" and three_d:
            y = node("RotaryEmbedding", [y, *rope_inputs], interleaved=interleaved, num_heads=2)
        y = node("Transpose", [node("Reshape", [y, "split"])], perm=[0, 2, 1, 3])
        if p != "v" and not three_d:
            y = node("RotaryEmbedding", [y, *rope_inputs], interleaved=interleaved)
        sides.append(y)
    q, k, v = sides
    scores = node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])])
    mixed = node("MatMul", [node("Softmax", [scores], axis=-1), v])
    merged = node("Reshape", [node("Transpose", [mixed], perm=[0, 2, 1, 3]), "merge"])
    nodes.append(h.make_node("MatMul", [merged, weight("wo")], ["y"]))
    graph = h.make_graph(
        nodes,
        "rope",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [b, t, c])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [b, t, c])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23)])
    model.ir_version = 10
    return model, rng.standard_normal((b, t, c)).astype(np.float32)


@pytest.mark.parametrize("positions", [False, True], ids=["caches", "position_ids"])
@pytest.mark.parametrize("interleaved", [0, 1])
def test_opset_23_rotary_embedding_is_one_node_and_q_to_k_ties_its_pairs(interleaved, positions):
    from tests.helpers.ir_transformers import random_scales_objective

    model, x = _rotary_attention(interleaved, positions)
    graph = cle_onnx.OnnxBackend().to_ir(model).graph
    graph.validate()
    assert [n.op for n in graph.nodes].count("rotary") == 2
    # the IR runs it as onnxruntime does
    np.testing.assert_allclose(
        run_graph(graph, {"x": x})["y"], _run(model, x), rtol=1e-4, atol=1e-4
    )
    serialized = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, objective=random_scales_objective())
    assert model.SerializeToString() == serialized
    (qk,) = [r for r in report.regions if r.kind == "qk"]
    pairs = np.arange(16) ^ (1 if interleaved else 4)
    assert qk.tied == 8 and np.array_equal(qk.scales, qk.scales[pairs])
    assert qk.scales.max() / qk.scales.min() > 5
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90


def test_a_rotary_embedding_of_merged_heads_is_refused_with_the_reason():
    model, _ = _rotary_attention(three_d=True)
    _, report = cle_onnx.equalize_model(model)
    assert "qk" not in [r.kind for r in report.regions]
    reasons = " ".join(s.reason for s in report.skipped)
    assert "its input is not 4-D (B, H, S, D)" in reasons, reasons


@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("form", ["chunk", "slice", "hf", "gptj"])
def test_each_exporter_s_rotary_embedding_is_one_node(form, dynamo, tmp_path):
    """``rotate_half`` by chunk, by slices, and as Hugging Face writes it (``x[..., :
    x.shape[-1] // 2]``), and GPT-J's ``rotate_every_two`` (strided Slices, Neg,
    Unsqueeze, Concat, Reshape: pairs (2i, 2i + 1)), each exporter: one ``rotary`` for q
    and one for k, and Q -> K through them exact under random scales, the rotated pairs
    tied."""
    from tests.helpers.ir_transformers import random_scales_objective

    path, x = _export_rope(form, dynamo, tmp_path)
    model = onnx.load(str(path))
    graph = cle_onnx.OnnxBackend().to_ir(model).graph
    rotaries = [n for n in graph.nodes if n.op == "rotary"]
    assert [n.attrs["interleaved"] for n in rotaries] == [form == "gptj"] * 2
    # the IR runs it as onnxruntime does
    np.testing.assert_allclose(
        run_graph(graph, {"x": x})[graph.outputs[0].name], _run(model, x), rtol=1e-4, atol=1e-5
    )
    before = path.read_bytes()
    eq, report = cle_onnx.equalize_model(str(path), objective=random_scales_objective())
    assert path.read_bytes() == before
    (qk,) = [r for r in report.regions if r.kind == "qk"]
    pairs = np.arange(16) ^ (1 if form == "gptj" else 4)  # (2i, 2i + 1) or (d, d + 4)
    assert qk.tied == 8 and np.array_equal(qk.scales, qk.scales[pairs])
    assert qk.scales.max() / qk.scales.min() > 5
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("position_ids-ts", "is computed at run time from the graph input 'position_ids'"),
        ("position_ids-dynamo", "is computed at run time from the graph input 'position_ids'"),
        ("dynamic-ts", "has no value here (a sequence length left dynamic?)"),
    ],
)
def test_rotary_tables_computed_at_run_time_are_refused_with_the_reason(
    always_scale, case, why, tmp_path
):
    """Hugging Face's rotary tables from a ``position_ids`` input (both exporters), or
    from a sequence length left dynamic: no value to give the IR's ``rotary``, so each is
    an opaque node saying why, Q -> K is refused, and the rest is equalized exactly; the
    file is left byte-identical. With the length given (``input_shapes``) the reader
    folds the tables: one ``rotary`` each for q and k."""
    variant, exporter = case.split("-")
    model = tm_llama_hf(positions="input" if variant == "position_ids" else "arange")
    tokens = model.example_input(2)
    feeds = {"x": tokens.numpy()}
    args = (tokens,)
    if variant == "position_ids":
        feeds["position_ids"] = np.tile(np.arange(16), (2, 1))
        args = (tokens, torch.from_numpy(feeds["position_ids"]))
    path = tmp_path / f"{case}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=exporter == "dynamo",
            opset_version=None if exporter == "dynamo" else 17,
            input_names=list(feeds),
            dynamic_axes={"x": {0: "batch", 1: "length"}} if variant == "dynamic" else None,
        )
    before = path.read_bytes()
    graph = cle_onnx.OnnxBackend().to_ir(onnx.load(str(path))).graph
    assert "rotary" not in [n.op for n in graph.nodes]
    rotaries = [n for n in graph.nodes if n.attrs.get("kind") == "rotary embedding"]
    assert len(rotaries) == 4 and all(why in n.attrs["why"] for n in rotaries)
    eq, report = cle_onnx.equalize_model(str(path))
    assert path.read_bytes() == before
    assert "qk" not in [r.kind for r in report.regions] and report.regions
    reasons = " ".join(s.reason for s in report.skipped if "Q K^T" in s.candidate)
    if variant == "position_ids":  # (a dynamic length loses q's heads before, at a Reshape)
        assert "opaque rotary embedding" in reasons and why in reasons, reasons

    def run(proto):
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)[0]

    assert sqnr_db(run(onnx.load(str(path))), run(eq)) >= 90
    if variant == "dynamic":
        model = onnx.load(str(path))
        graph = cle_onnx.OnnxBackend().to_ir(model, input_shapes={"x": [2, 16]}).graph
        assert [n.op for n in graph.nodes].count("rotary") == 4


@pytest.mark.parametrize("n", [16, 5000])
def test_a_matmul_of_constants_is_folded_up_to_the_fold_limit(n):
    """The reader folds a MatMul of constants (a rotary's ``inv_freq @ positions``), but
    bounds it by its output, not its operands: an outer product of ``n`` by ``n`` is
    folded for n = 16, not for n = 5000 (25 M elements, over the limit), which says so."""
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from cle_onnx._translate.constants import _FOLD_LIMIT
    from cle_onnx._translate.reader import _Reader

    column, row = np.ones((n, 1), np.float32), np.ones((1, n), np.float32)
    nodes = [
        h.make_node("Constant", [], ["a"], value=nh.from_array(column)),
        h.make_node("Constant", [], ["b"], value=nh.from_array(row)),
        h.make_node("MatMul", ["a", "b"], ["outer"]),
        h.make_node("Add", ["x", "outer"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "outer",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
    )
    reader = _Reader(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), False, None)
    if n * n <= _FOLD_LIMIT:
        np.testing.assert_array_equal(reader.constants["outer"], column @ row)
    else:
        assert "outer" not in reader.constants
        assert "too large to fold (of 25000000 elements)" in reader.unfolded["outer"]
