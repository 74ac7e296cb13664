"""Hugging Face ``transformers`` models as users export them (issue 21): tiny BERT, ViT,
LLaMA (grouped-query attention, rotary) and GPT-2 exported by both torch exporters,
stored under ``tests/fixtures/hf/`` (``make_fixtures.py`` there says how they were made
and regenerates them; these tests need neither ``transformers`` nor torch). Each file:
the regions of the pairs docs/transformers.rst promises, in graph order (a lost pair
fails), the refusals with their reasons, FP32 exactness in onnxruntime (>= 90 dB) with
every region forced to random scales over two decades, and the file unchanged.

Then the translations these exports needed, each on a small graph: a Cast to the type a
value already has (Hugging Face's RMSNorm computes in float32), initializers that the
dynamo exporter merges because their values are equal (an untrained model's zero biases
and unit norm scales), and a heads split whose batch is read from another value (the
TorchScript exporter with a dynamic batch)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from cle_core._cli import main  # noqa: E402
from tests.helpers.ir_transformers import random_scales_objective  # noqa: E402
from tests.helpers.onnx_corpus import _Builder, sqnr_db  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TOKENS = MANIFEST["files"]["bert_ts.onnx"]["input"][1]

# Per layer: BERT (post-LN) K -> q and V -> O; its norms feed the residual stream, all but
# the last, which feeds the classifier alone (through the class token). ViT and LLaMA
# (pre-LN): the attention norm -> q, k, v, K -> q, V -> O, the MLP norm -> fc1 (ViT) or
# gate and up (LLaMA), up -> down (LLaMA's SwiGLU); the final norm -> the head. GPT-2's
# q and k are cut from one packed c_attn: no K -> q, V -> O through it.
BERT = ["qk", "attention", "qk", "attention", "norm"]
VIT = ["norm", "qk", "attention", "norm"] * 2 + ["norm"]
# (Both exporters: the TorchScript one computes the rotary tables in the graph from the
# positions, a MatMul, Cos and Sin of constants that the reader folds.)
LLAMA = ["norm", "qk", "attention", "norm", "gated"] * 2 + ["norm"]
GPT2 = ["norm", "attention", "norm"] * 2 + ["norm"]
EXPECTED = {
    "bert_ts.onnx": BERT,
    "bert_dynamo.onnx": BERT,
    "bert_ts_dynbatch.onnx": BERT,
    "bert_dynamo_hfinit.onnx": BERT,
    # a dynamic sequence length too: the heads' Reshapes have two unknown sizes (below:
    # with the length given)
    "bert_dynamo_dynseq.onnx": ["norm"],
    "vit_ts.onnx": VIT,
    "vit_dynamo.onnx": VIT,
    "llama_ts.onnx": LLAMA,
    "llama_dynamo.onnx": LLAMA,
    "gpt2_ts.onnx": GPT2,
    "gpt2_dynamo.onnx": GPT2,
}
# (a part of) the reasons the report gives for what is refused
GELU = "x * f(x), an activation that gates its own input (GELU ...)"
REFUSED = {
    "bert": ["is normalized by", GELU, "opaque Tanh"],
    "vit": [GELU],
    "llama": ["a SiLU (not homogeneous)"],
    "gpt2": ["the MatMul sums over the channels", GELU],
}


def test_the_fixtures_are_all_here_and_small():
    files = sorted(p.name for p in FIXTURES.glob("*.onnx"))
    assert files == sorted(EXPECTED) == sorted(MANIFEST["files"])
    sizes = [(FIXTURES / f).stat().st_size for f in files]
    assert max(sizes) < 300_000 and sum(sizes) < 1_500_000


def _input(name: str) -> np.ndarray:
    spec = MANIFEST["files"][name]
    rng = np.random.default_rng(0)
    if spec["vocab"]:
        return rng.integers(0, spec["vocab"], spec["input"]).astype(spec["dtype"])
    return rng.standard_normal(spec["input"]).astype(spec["dtype"])


def _run(model, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hf_export_is_equalized_exactly_with_the_regions_promised(name):
    path = FIXTURES / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    x = _input(name)
    expected = _run(path.read_bytes(), x)
    eq, report = cle_onnx.equalize_model(str(path), objective=random_scales_objective())
    summary = report.summary(verbose=True)
    assert [r.kind for r in report.regions] == EXPECTED[name], summary
    # every region scaled (the write-back of each is exercised) ...
    assert all(r.scales.max() / r.scales.min() > 3 for r in report.regions), summary
    # ... and the function kept
    assert sqnr_db(expected, _run(eq, x)) >= 90, summary
    if name.startswith("llama"):  # K -> q through the rotary embedding
        qk = [r for r in report.regions if r.kind == "qk"]
        assert [r.tied for r in qk] == [8, 8], summary
    model = name.split("_")[0]
    reasons = " | ".join(s.reason for s in report.skipped)
    for reason in REFUSED[model]:
        assert reason in reasons, summary
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_dynamic_sequence_length_is_named_and_can_be_given():
    """Left dynamic, the heads' Reshapes say which size to give; given, the pairs are
    found, and the equalized file is exact at every length (the scales do not depend on
    it)."""
    path = FIXTURES / "bert_dynamo_dynseq.onnx"
    _, report = cle_onnx.equalize_model(str(path))
    reasons = [s.reason for s in report.skipped if s.stage == "translate"]
    assert any(
        "axis 1 is dynamic besides the batch: give it with input_shapes=" in r for r in reasons
    )
    eq, report = cle_onnx.equalize_model(
        str(path), objective=random_scales_objective(), input_shapes={"x": (None, TOKENS)}
    )
    assert [r.kind for r in report.regions] == BERT, report.summary(verbose=True)
    rng = np.random.default_rng(1)
    for tokens in (TOKENS, 3, 16):
        x = rng.integers(0, MANIFEST["files"][path.name]["vocab"], (3, tokens))
        assert sqnr_db(_run(path.read_bytes(), x), _run(eq, x)) >= 90, tokens


@pytest.mark.parametrize("name", ["bert_ts.onnx", "llama_dynamo.onnx"])
def test_the_default_objective_keeps_the_function(name):
    """The noise objective (the default) on the same files: whatever it scales, exact."""
    x = _input(name)
    eq, report = cle_onnx.equalize_model(str(FIXTURES / name))
    assert [r.kind for r in report.regions] == EXPECTED[name]
    assert sqnr_db(_run((FIXTURES / name).read_bytes(), x), _run(eq, x)) >= 90


def test_inspect_lists_the_pairs_and_the_refusals(capsys):
    assert main(["inspect", str(FIXTURES / "bert_ts.onnx"), "-v"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^  #\d+ ([\w-]+), \d+ channels:", out, flags=re.M) == BERT, out
    for reason in REFUSED["bert"]:
        assert reason in out, out


# --- the translations, on small graphs ---------------------------------------------------


def _linear(b: _Builder, x: str, cin: int, cout: int, bias: str | None = None) -> str:
    h = b.node("MatMul", [x, b.init(b.spread((cin, cout), axis=1))])
    return b.node("Add", [h, bias or b.init(b.normal(cout), "bias")])


def _exact(model, x, objective=None):
    kwargs = {"objective": objective} if objective else {}
    eq, report = cle_onnx.equalize_model(model, **kwargs)
    assert sqnr_db(_run(model, x), _run(eq, x)) >= 90, report.summary(verbose=True)
    return eq, report


def _hf_rms_norm(b: _Builder, x: str, c: int, to: int = onnx.TensorProto.FLOAT) -> str:
    """Hugging Face's LlamaRMSNorm as the TorchScript exporter writes it:
    ``x.to(float32)``, ``x * 1 / sqrt(mean(x^2) + eps)``, ``.to(input_dtype)``, times
    the weight."""
    x32 = b.node("Cast", [x], to=onnx.TensorProto.FLOAT)
    mean = b.node("ReduceMean", [b.node("Pow", [x32, b.init(np.array(2.0), "two")])], axes=[-1])
    root = b.node("Sqrt", [b.node("Add", [mean, b.init(np.array(1e-6), "eps")])])
    inverse = b.node("Div", [b.init(np.array(1.0), "one"), root])
    back = b.node("Cast", [b.node("Mul", [x32, inverse])], to=to)
    return b.node("Mul", [b.init(10.0 ** b.rng.uniform(-1, 1, c), "weight"), back])


def test_a_cast_to_the_same_type_is_the_identity_inside_a_norm_too():
    b = _Builder(0, 17)
    _linear(b, _hf_rms_norm(b, "x", 8), 8, 6)
    model = b.untyped_model((2, 5, 8))
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    _, report = _exact(model, x, random_scales_objective())
    assert [r.kind for r in report.regions] == ["norm"], report.summary(verbose=True)


def test_a_cast_to_another_type_is_left_out_with_the_reason():
    """Cast to float16 and back rounds: not the identity; the Casts stay opaque and end
    the region between the two Linears."""
    b = _Builder(1, 17)
    h = b.node("Cast", [_linear(b, "x", 8, 8)], to=onnx.TensorProto.FLOAT16)
    h = b.node("Cast", [h], to=onnx.TensorProto.FLOAT)
    _linear(b, h, 8, 6)
    model = b.untyped_model((2, 5, 8))
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    _, report = _exact(model, x)
    assert list(report.regions) == []
    reasons = [s.reason for s in report.skipped]
    assert any("it converts to another element type" in r for r in reasons), reasons


def test_initializers_merged_for_equal_values_are_given_one_copy_each():
    """Two Linear -> ReLU -> Linear pairs and two LayerNorms reading the same bias, gamma
    and beta (as the dynamo exporter writes an untrained model: every zero bias one
    tensor): each pair and norm is equalized, each writes its own copy, and the tensor
    the other nodes read keeps its values."""
    b = _Builder(2, 17)
    bias = b.init(b.normal(8), "shared_bias")
    gamma, beta = b.init(np.ones(8), "ones"), b.init(np.zeros(8), "zeros")
    outs = []
    for _ in range(2):
        h = b.node("LayerNormalization", ["x", gamma, beta], axis=-1)
        h = b.node("Relu", [_linear(b, h, 8, 8, bias)])
        outs.append(_linear(b, h, 8, 8, bias))
    model = b.untyped_model((2, 5, 8), outs)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    eq, report = _exact(model, x, random_scales_objective())
    assert sorted(r.kind for r in report.regions) == ["norm", "norm", "pair", "pair"]
    assert all(r.scales.max() / r.scales.min() > 3 for r in report.regions)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in eq.graph.initializer}
    bias_reads = [n.input[1] for n in eq.graph.node if n.op_type == "Add"]
    assert len(set(bias_reads)) == 4  # four copies, each scaled by its own layer's region
    for name in {"shared_bias", "ones", "zeros"} & set(inits):
        original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        assert np.array_equal(inits[name], original[name])


def test_a_weight_matrix_read_by_two_layers_stays_shared_and_refused():
    """Tying a weight is meant (an embedding and the head, ALBERT's layers): not untied."""
    b = _Builder(3, 17)
    w = b.init(b.spread((8, 8), axis=1))
    h = b.node("Relu", [b.node("MatMul", ["x", w])])
    b.node("MatMul", [h, w])
    model = b.untyped_model((2, 5, 8))
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    _, report = _exact(model, x)
    assert list(report.regions) == []
    assert any("shares a parameter" in s.reason for s in report.skipped)


def test_heads_split_with_the_batch_of_another_value_under_a_dynamic_batch():
    """``view(*hidden.shape[:-1], -1, d)`` as the TorchScript exporter writes it with a
    dynamic batch: every head split and merge reads the batch with Shape from one value
    (the norm's output here) that is not the one reshaped. Shape inference names both
    batches alike; the reshapes are then static but for the batch, and V -> O and K -> q
    are found."""
    b = _Builder(4, 17)
    t, c, heads = 5, 8, 2
    gamma, beta = b.init(10.0 ** b.rng.uniform(-1, 1, c), "gamma"), b.init(b.normal(c), "beta")
    n = b.node("LayerNormalization", ["x", gamma, beta], axis=-1)
    first = b.init(np.array(0), "first", dtype=np.int64)
    batch = b.node("Gather", [b.node("Shape", [n]), first], axis=0)  # a scalar
    batch = b.node("Unsqueeze", [batch, b.ints([0], "axis0")])
    split = b.node("Concat", [batch, b.ints([t, -1, c // heads], "split")], axis=0)
    merge = b.node("Concat", [batch, b.ints([t, -1], "merge")], axis=0)

    def heads_of(h):
        return b.node("Transpose", [b.node("Reshape", [h, split])], perm=[0, 2, 1, 3])

    q, k, v = (heads_of(_linear(b, n, c, c)) for _ in range(3))
    scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    merged = b.node("Reshape", [b.node("Transpose", [mixed], perm=[0, 2, 1, 3]), merge])
    _linear(b, merged, c, c)
    model = b.untyped_model(("batch", t, c))
    x = np.random.default_rng(0).standard_normal((3, t, c)).astype(np.float32)
    _, report = _exact(model, x, random_scales_objective())
    assert [r.kind for r in report.regions] == ["norm", "qk", "attention"], report.summary(True)


def _gelu(b: _Builder, x: str, form: str) -> str:
    """GELU written out as the exporters write it: ``x * 0.5 * (1 + erf(x / sqrt(2)))``
    (TorchScript) or its tanh form, ``0.5 * (x * (1 + tanh(c * (x + 0.044715 x^3))))``
    (Hugging Face's ``gelu_pytorch_tanh``, Gemma's gate), the constant last."""
    one = b.init(np.array(1.0), "one")
    if form == "erf":
        inner = b.node("Erf", [b.node("Div", [x, b.init(np.array(np.sqrt(2.0)), "root2")])])
        return b.node("Mul", [b.node("Mul", [x, b.node("Add", [inner, one])]), b.init(0.5)])
    cube = b.node("Mul", [x, b.node("Mul", [x, x])])
    inner = b.node("Add", [x, b.node("Mul", [b.init(np.array(0.044715), "c3"), cube])])
    t = b.node("Tanh", [b.node("Mul", [b.init(np.array(0.7978845608), "c"), inner])])
    return b.node(
        "Mul", [b.init(np.array(0.5), "half"), b.node("Mul", [x, b.node("Add", [one, t])])]
    )


@pytest.mark.parametrize("form", ["erf", "tanh"])
@pytest.mark.parametrize("act_first", [True, False])
def test_a_geglu_mlp_is_a_gated_region(form, act_first):
    """``down(gelu(gate(x)) * up(x))`` with the GELU written out: its final product is
    the activation (opaque, it gates its own input), and the MLP's product carries up's
    channels to down whichever operand comes first."""
    b = _Builder(5, 17)
    gamma, beta = b.init(10.0 ** b.rng.uniform(-1, 1, 8), "gamma"), b.init(b.normal(8), "beta")
    n = b.node("LayerNormalization", ["x", gamma, beta], axis=-1)
    act, up = _gelu(b, _linear(b, n, 8, 12), form), _linear(b, n, 8, 12)
    _linear(b, b.node("Mul", [act, up] if act_first else [up, act]), 12, 8)
    model = b.untyped_model((2, 5, 8))
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    _, report = _exact(model, x, random_scales_objective())
    assert [r.kind for r in report.regions] == ["norm", "gated"], report.summary(True)
    reasons = [s.reason for s in report.skipped]
    assert any("an activation that gates its own input" in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("model", "exporter"), [("bert", "ts"), ("llama", "dynamo"), ("gpt2", "ts")]
)
def test_a_fresh_export_with_the_installed_transformers_finds_the_same(model, exporter):
    """With ``transformers`` installed (whatever its version): the model exported now, as
    ``make_fixtures.py`` does, gives the regions its stored file gives, exactly."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    net, x = make.build(model)
    proto = make.export(net, x, exporter, "")
    eq, report = cle_onnx.equalize_model(proto, objective=random_scales_objective())
    assert [r.kind for r in report.regions] == EXPECTED[f"{model}_{exporter}.onnx"]
    assert sqnr_db(_run(proto, x.numpy()), _run(eq, x.numpy())) >= 90
