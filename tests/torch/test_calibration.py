"""Calibration: statistics measured on a few inputs replace the data-free estimates, in
both backends and the CLI. The equalized model stays exact (relative error 1e-5 in
float32, as everywhere), and bad calibration input is one clear error with nothing
changed."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import cle_onnx  # noqa: E402
import cle_torch  # noqa: E402
from cle_core import CLEError, NonFiniteError  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from cle_torch._calibrate import calibration_stats  # noqa: E402
from cle_torch._translate import capture  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402
from tests.helpers import torch_models as tm  # noqa: E402


def test_torch_statistics_are_measured_per_ir_value():
    model, shape = tm.mobilenet_v2()
    x = torch.randn(12, *shape[1:])
    cap = capture(model, shape)
    stats = calibration_stats(cap, x)
    first = next(n for n in cap.ir.nodes if n.is_layer)
    with torch.no_grad():
        out = model[0][0](x)  # the stem conv, before its BN
    got = stats[first.outputs[0].name]
    np.testing.assert_allclose(got.mean, out.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.hi, out.amax(dim=(0, 2, 3)).numpy(), rtol=1e-6)
    batches = [x[:5], x[5:]]  # an iterable of batches gives the same numbers
    again = calibration_stats(cap, batches)[first.outputs[0].name]
    np.testing.assert_allclose(again.meansq, got.meansq, rtol=1e-9)


def test_torch_equalize_with_calibration_is_exact():
    model, shape = tm.resnet()
    x = torch.randn(8, *shape[1:])
    with torch.no_grad():
        y0 = model(x)
    new, report = cle_torch.equalize_model(model, shape, calibration=torch.randn(16, *shape[1:]))
    with torch.no_grad():
        assert sqnr_db(y0.numpy(), new(x).numpy()) > 100
    assert report.noise is not None and report.regions


def test_torch_bad_calibration_changes_nothing():
    model, shape = tm.resnet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CLEError, match="calibration"):
        cle_torch.equalize_model(model, shape, calibration=torch.randn(4, 5, 16, 16))
    with pytest.raises(CLEError, match="calibration"):
        cle_torch.equalize_model(model, shape, calibration="images/")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_equalize_with_calibration(tmp_path):
    model = om.depthwise_triple()
    calib = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, calibration=calib)
    assert model.SerializeToString() == before and report.noise is not None
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    assert sqnr_db(run(model), run(eq)) > 100
    # file to file, external data included
    src = tmp_path / "m.onnx"
    om.save_external(model, src, "m.onnx.data")
    report2, files = cle_onnx.equalize_file(src, tmp_path / "o.onnx", calibration=calib)
    assert len(report2.regions) == len(report.regions)
    with pytest.raises(CLEError, match="no values for input 'x'"):
        cle_onnx.equalize_model(model, calibration={"nope": calib})


def test_cli_calibration_from_npy(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    npy = tmp_path / "calib.npy"
    np.save(npy, np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    assert (
        main(
            [
                "equalize",
                str(src),
                "-o",
                str(tmp_path / "o.onnx"),
                "--calibration",
                str(npy),
                "--check",
            ]
        )
        == 0
    )
    capsys.readouterr()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((8, 5, 8, 8), np.float32))
    assert (
        main(["equalize", str(src), "-o", str(tmp_path / "o2.onnx"), "--calibration", str(bad)])
        == 2
    )
    assert "calibration" in capsys.readouterr().err
    assert not (tmp_path / "o2.onnx").exists()
    assert (
        main(
            [
                "equalize",
                str(src),
                "-o",
                str(tmp_path / "o3.onnx"),
                "--calibration",
                str(npy),
                "--objective",
                "balance",
            ]
        )
        == 2
    )
    assert not (tmp_path / "o3.onnx").exists()


def test_cli_calibration_from_an_image_folder(tmp_path, capsys):
    skio = pytest.importorskip("skimage.io")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        skio.imsave(str(folder / f"{i}.png"), (rng.random((20, 24, 3)) * 255).astype(np.uint8))
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    assert (
        main(
            [
                "equalize",
                str(src),
                "-o",
                str(tmp_path / "o.onnx"),
                "--calibration",
                str(folder),
                "--quiet",
            ]
        )
        == 0
    )


def test_onnx_calibration_with_fewer_inputs_than_a_batch_on_a_dynamic_batch():
    # A model without a fixed batch size runs calibration in batches of up to 4; two
    # inputs are one smaller batch, not an error.
    model = om.depthwise_triple()
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    calib = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _, report = cle_onnx.equalize_model(model, calibration=calib)
    assert report.noise is not None and report.regions


# --- calibration never changes the model ------------------------------------------------


class ConcatBN(nn.Module):
    """A batch norm after a Concat stays in the result; dropout before the head."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.act = act
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.act(self.a(x)), self.act(self.b(x))], 1)
        return self.head(self.drop(F.relu(self.bn(y))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, z):
        return self.head(self.drop(self.a(x) + self.b(z)))


def _calibration_set(n=24, shape=(3, 8, 8), seed=1):
    # Far from the running statistics: a batch norm in training mode would move them.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * 3 + 1


def snapshot(model: nn.Module):
    """Every parameter and buffer (object and bytes) and every training flag."""
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    return (
        [(n, id(t), t.dtype, t.detach().cpu().numpy().tobytes()) for n, t in tensors],
        [(n, m.training) for n, m in model.named_modules()],
    )


def _stats_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k]._arrays(), b[k]._arrays(), strict=True):
            np.testing.assert_array_equal(x, y)


def test_training_mode_calibration_runs_as_in_eval_mode():
    # Issue 17, serious bug 2: the caller's running statistics moved, and the result
    # drifted from the eval-mode model the docs promise (7.7 dB).
    model = tm.randomize(ConcatBN()).train()
    original = copy.deepcopy(model).eval()
    calib = _calibration_set()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        y0 = original(x)
    new, _ = cle_torch.equalize_model(model, allow_training_mode=True, calibration=calib)
    assert new is model and isinstance(new.bn, nn.BatchNorm2d)  # in place, the BN kept
    assert all(m.training for m in new.modules())  # the flags are kept
    twin, _ = cle_torch.equalize_model(copy.deepcopy(original), calibration=calib)
    got, want = new.state_dict(), twin.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        assert sqnr_db(y0.numpy(), copy.deepcopy(new).eval()(x).numpy()) > 100


def test_training_mode_model_is_untouched_when_the_result_is_a_graph_module():
    model = tm.randomize(ConcatBN(act=F.relu6)).train()
    original = copy.deepcopy(model).eval()
    before = snapshot(model)
    x = torch.randn(8, 3, 8, 8)
    new, _ = cle_torch.equalize_model(
        model, allow_training_mode=True, calibration=_calibration_set()
    )
    assert new is not model and snapshot(model) == before
    with torch.no_grad():
        assert sqnr_db(original(x).numpy(), new.eval()(x).numpy()) > 100


def test_capture_runs_no_forward_pass_and_restores_the_flags():
    # Tracing is symbolic; the shapes that dummy_input gives are measured on a copy
    # without the caller's hooks: the model itself never runs, and the eval flags that
    # tracing sets are put back.
    model = tm.randomize(ConcatBN()).train()
    calls = []
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    before = snapshot(model)
    capture(model, dummy_input=torch.randn(2, 3, 8, 8), allow_training_mode=True)
    assert not calls and snapshot(model) == before


def _as_batches(kind, x):
    if kind == "tensor":
        return x
    if kind == "numpy":
        return x.numpy()
    if kind == "numpy_float64":
        return x.numpy().astype(np.float64)
    if kind == "list":
        return [x[:10], x[10:]]
    if kind == "generator":
        return (x[i : i + 5] for i in range(0, len(x), 5))
    if kind == "tuples":
        return [(x[:10],), (x[10:].numpy(),)]
    if kind == "data_loader":
        data = torch.utils.data.TensorDataset(x)
        return torch.utils.data.DataLoader(data, batch_size=7)
    raise ValueError(kind)


KINDS = ["tensor", "numpy", "numpy_float64", "list", "generator", "tuples", "data_loader"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_calibration_path_leaves_the_model_byte_identical(kind, train):
    model, shape = tm.mobilenet_v2()  # batch norms and dropout
    model.train(train)
    x = _calibration_set(20, shape[1:])
    reference = calibration_stats(capture(copy.deepcopy(model).eval(), shape), x)
    before = snapshot(model)
    cap = capture(model, shape, allow_training_mode=True)
    stats = calibration_stats(cap, _as_batches(kind, x))
    assert snapshot(model) == before
    if kind in ("tensor", "numpy", "numpy_float64"):  # the same batches: the same sums
        _stats_equal(stats, reference)
    for k in reference:  # other batches: the same sums in another order
        np.testing.assert_allclose(stats[k].meansq, reference[k].meansq, rtol=1e-5)
        np.testing.assert_array_equal(stats[k].hi, reference[k].hi)


def test_two_input_calibration_leaves_the_model_byte_identical():
    model = tm.randomize(TwoInputs()).train()
    x, z = _calibration_set(12), _calibration_set(12, seed=2)
    before = snapshot(model)
    cap = capture(model, allow_training_mode=True)
    stats = calibration_stats(cap, [(x[:6], z[:6]), [x[6:].numpy(), z[6:]]])
    assert snapshot(model) == before and stats
    _, report = cle_torch.equalize_model(
        copy.deepcopy(model), allow_training_mode=True, calibration=[(x, z)]
    )
    assert report.noise is not None


def test_a_model_that_cannot_be_deep_copied_is_still_calibrated_on_a_copy():
    import threading

    model = tm.randomize(ConcatBN(act=F.relu6)).train()
    reference = calibration_stats(capture(copy.deepcopy(model).eval()), _calibration_set())
    model.lock = threading.Lock()  # deepcopy refuses it
    with pytest.raises(TypeError):
        copy.deepcopy(model)
    before = snapshot(model)
    stats = calibration_stats(capture(model, allow_training_mode=True), _calibration_set())
    assert snapshot(model) == before
    _stats_equal(stats, reference)


# --- every bad calibration input is one clear error ---------------------------------------


def _raising_generator(x):
    yield x[:4]
    yield x[4:8]
    raise RuntimeError("disk on fire")


def _bad(x):
    """(id, calibration, exception, fragments of the message)."""
    nan = x.clone()
    nan[5, 1, 2, 3] = float("nan")
    inf = x.numpy().copy()
    inf[0, 0, 0, 7] = np.inf
    late_nan = [x[:4], x[4:8].clone()]
    late_nan[1][2, 0, 1, 1] = float("nan")
    return [
        ("strings", np.full((4, 3, 8, 8), "a"), CLEError, ["calibration", "strings"]),
        (
            "structured",
            np.zeros((4, 3, 8, 8), dtype=[("a", "f4")]),
            CLEError,
            ["calibration", "structured records"],
        ),
        ("objects", x.numpy().astype(object), CLEError, ["calibration", "Python objects"]),
        ("complex_array", x.numpy().astype(np.complex64), CLEError, ["calibration", "complex"]),
        ("complex_tensor", x.to(torch.complex64), CLEError, ["calibration", "complex"]),
        ("nan", nan, NonFiniteError, ["calibration", "NaN", "(5, 1, 2, 3)"]),
        ("inf", inf, NonFiniteError, ["calibration", "Inf", "(0, 0, 0, 7)"]),
        ("late_nan", late_nan, NonFiniteError, ["calibration batch 1", "NaN", "(2, 0, 1, 1)"]),
        (
            "late_nan_tuple",
            [(x[:4],), (late_nan[1],)],
            NonFiniteError,
            ["calibration batch 1, input 0", "NaN"],
        ),
        ("path", "images/", CLEError, ["calibration", "'images/'", "path"]),
        ("pathlib", Path("calib.npy"), CLEError, ["calibration", "'calib.npy'", "path"]),
        ("ragged", [[0.1, 0.2], [0.3]], CLEError, ["calibration batch 0", "list", "torch.tensor"]),
        ("nested_lists", x.tolist(), CLEError, ["calibration batch 0", "list"]),
        ("dict", {"x": x}, CLEError, ["calibration", "dict", "iterable of batches"]),
        ("none_batch", [x[:4], None], CLEError, ["calibration batch 1", "NoneType"]),
        ("number", 3.0, CLEError, ["calibration", "float"]),
        ("empty", [], CLEError, ["calibration holds no inputs"]),
        ("uint8", (x.abs() * 40).to(torch.uint8), CLEError, ["calibration", "uint8", "floats"]),
        ("raising", _raising_generator(x), CLEError, ["calibration batch 2", "disk on fire"]),
        (
            "late_bad_shape",
            [x[:4], x[4:8, :2]],
            CLEError,
            ["does not run on calibration batch 1", "channels"],
        ),
    ]


BAD_IDS = [c[0] for c in _bad(torch.zeros(8, 3, 8, 8))]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_calibration_is_one_error_and_changes_nothing(case):
    model = tm.randomize(ConcatBN()).train()
    x = _calibration_set(8)
    _, calibration, exc, fragments = next(c for c in _bad(x) if c[0] == case)
    before = snapshot(model)
    with pytest.raises(exc) as info:
        cle_torch.equalize_model(model, allow_training_mode=True, calibration=calibration)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert snapshot(model) == before


def test_integer_inputs_reach_a_model_that_takes_them():
    # Integers are passed as they are: a model that scales uint8 images itself takes them.
    class Scales(ConcatBN):
        def forward(self, x):
            return super().forward(x.float() / 255.0)

    model = tm.randomize(Scales())
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    _, report = cle_torch.equalize_model(model, calibration=images)
    assert report.noise is not None


def test_float64_calibration_is_cast_to_the_model_dtype():
    model = tm.randomize(ConcatBN())
    x = _calibration_set(8)
    cap = capture(model)
    _stats_equal(calibration_stats(cap, x.double()), calibration_stats(cap, x))
    half = [x[:4].numpy(), x[4:].numpy() * 1e6]
    with pytest.raises(NonFiniteError, match=r"batch 1: the value .* overflows torch.float16"):
        calibration_stats(capture(copy.deepcopy(model).half()), half)


def test_verify_measures_both_and_never_touches_the_model():
    """``verify=True``: the original (BNs folded) and the equalized model are measured
    in the deployment (evaluate_torch, each half of the inputs calibrating while the
    other measures), on copies; the better one is returned."""
    from tests.helpers import torch_models as tm

    model, shape = tm.ARCHITECTURES["mobilenet_v2"]()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, *shape[1:])
    new, report = cle_torch.equalize_model(model, dummy_input=x[:1], calibration=x, verify=True)
    assert new is not model
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())
    v = report.verification
    assert v.inputs == 16 and v.kept in ("equalized", "original")
    assert (v.kept == "equalized") == (v.equalized_db >= v.original_db)
    with pytest.raises(CLEError, match="calibration"):
        cle_torch.equalize_model(model, dummy_input=x[:1], verify=True)


def test_verify_with_draws_returns_the_best_measured_draw():
    """``verify=True, draws=2``: the objective's scales and two redrawn ones measured
    (evaluate_torch), the best returned, equal to equalizing with that ``scale_draw``
    alone; the model is never touched."""
    from cle_torch import evaluate_torch
    from tests.helpers import torch_models as tm

    model, shape = tm.ARCHITECTURES["mobilenet_v2"]()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, *shape[1:])
    new, report = cle_torch.equalize_model(
        model, dummy_input=x[:1], calibration=x, verify=True, draws=2
    )
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())
    v = report.verification
    figures = [v.equalized_db, *v.drawn]
    assert len(figures) == 3 and len(set(figures)) == 3
    if v.kept == "equalized":
        assert figures[v.draw] == max(figures) and report.options.scale_draw == v.draw
        alone, _ = cle_torch.equalize_model(
            copy.deepcopy(model), dummy_input=x[:1], calibration=x, scale_draw=v.draw
        )
        assert all(
            torch.equal(a, b)
            for a, b in zip(new.state_dict().values(), alone.state_dict().values(), strict=True)
        )
    else:
        assert max(figures) < v.original_db
    one = evaluate_torch(model, new, x[8:], calibration=x[:8])["w8a8_sqnr"]
    other = evaluate_torch(model, new, x[:8], calibration=x[8:])["w8a8_sqnr"]
    assert (one + other) / 2 == pytest.approx(max(v.original_db, *figures), rel=1e-9)
    with pytest.raises(CLEError, match="draws needs verify"):
        cle_torch.equalize_model(model, dummy_input=x[:1], calibration=x, draws=2)


def test_verify_with_draws_and_a_margin_returns_what_verify_alone_returns(monkeypatch):
    """With a margin no draw clears, the model returned is verify alone's (draw 0
    equalized again where best_draw held another), weight for weight."""
    import cle_core._verify as verify
    from tests.helpers import torch_models as tm

    model, shape = tm.ARCHITECTURES["resnet"]()
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(0))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 1e3)
    new, report = cle_torch.equalize_model(
        model, dummy_input=x[:1], calibration=x, verify=True, draws=2
    )
    alone, alone_report = cle_torch.equalize_model(
        model, dummy_input=x[:1], calibration=x, verify=True
    )
    v = report.verification
    assert max(v.drawn) > v.equalized_db  # best_draw held a redrawn one
    assert v.draw == 0 and v.margin == 1e3
    assert report.verification.kept == alone_report.verification.kept
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())
    assert all(
        torch.equal(a, b)
        for a, b in zip(new.state_dict().values(), alone.state_dict().values(), strict=True)
    )


def test_verify_runs_the_fp32_model_once_for_every_candidate(monkeypatch):
    """verify measures the original and each draw against one FP32 reference run per
    half of the inputs (``evaluate_torch(..., reference=)``), with the figures a fresh
    run gives."""
    from cle_torch import _backend, _quantsim, evaluate_torch
    from tests.helpers import torch_models as tm

    model, shape = tm.ARCHITECTURES["resnet"]()
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(0))
    calls = []
    real = _quantsim.reference_outputs

    def counted(tag):
        return lambda *a, **k: calls.append(tag) or real(*a, **k)

    monkeypatch.setattr(_quantsim, "reference_outputs", counted("evaluate_torch"))
    monkeypatch.setattr(_backend, "reference_outputs", counted("verify"))
    new, report = cle_torch.equalize_model(
        model, dummy_input=x[:1], calibration=x, verify=True, draws=2
    )
    assert calls == ["verify", "verify"]  # each half measures once
    monkeypatch.undo()
    fresh = evaluate_torch(model, new, x[8:], calibration=x[:8])
    given = evaluate_torch(model, new, x[8:], calibration=x[:8], reference=real(model, x[8:]))
    assert given == fresh
    with pytest.raises(ValueError, match="reference has 8 outputs for 7 inputs"):
        evaluate_torch(model, new, x[9:], reference=real(model, x[8:]))
    other = evaluate_torch(model, new, x[:8], calibration=x[8:])
    v = report.verification
    assert (fresh["w8a8_sqnr"] + other["w8a8_sqnr"]) / 2 == pytest.approx(
        max(v.original_db, v.equalized_db, *v.drawn), rel=1e-9
    )
