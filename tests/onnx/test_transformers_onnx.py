"""Transformers and ConvNeXt through the ONNX backend (issue 21): every model of
``tests/helpers/transformer_models.py``, exported with the TorchScript exporter
(``dynamo=False``) and with ``dynamo=True`` where it exports, is equalized exactly (FP32
output SQNR >= 90 dB in onnxruntime against the original file) with the noise objective
and with ``objective="balance"`` (which refuses norm regions); the kinds of region found
are the list below, in graph order (a lost pair fails the test), and ``cle inspect``
lists them and the refused ones with their reasons."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import cle_onnx  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_onnx._backend import _channel_axes  # noqa: E402
from cle_onnx._calibrate import calibration_stats  # noqa: E402
from tests.helpers.onnx_corpus import sqnr_db  # noqa: E402
from tests.helpers.transformer_models import VARIANTS  # noqa: E402

# The regions (kinds, in graph order) of each model and exporter. What is not there:
# Q -> K (scaled by rotary's per-position cos / sin, or summed over by Q K^T), GELU /
# SiLU between layers, the residual stream (it starts at an embedding or a constant
# Add), post-LN norms (BERT: their output feeds the residual too), V -> O with
# grouped-query attention (the K / V heads' repetition is opaque), V -> O behind
# nn.MultiheadAttention's packed in-projection (its q / k / v split is not a channel
# slice the core follows), and the final norm -> head through the class token
# (``x[:, 0]``, a Gather: no IR op selects a position).
VIT = ["norm", "attention", "norm"] * 2
LLAMA = ["norm", "norm", "gated"] * 2 + ["norm"]
EXPECTED = {
    ("vit", "ts"): VIT,
    ("vit", "dynamo"): VIT,
    ("vit_mean_pool", "ts"): [*VIT, "norm"],
    ("vit_mean_pool", "dynamo"): [*VIT, "norm"],
    ("vit_sdpa", "ts"): VIT,
    ("vit_sdpa", "dynamo"): VIT,
    ("vit_mha", "ts"): ["norm"] * 4,
    # the dynamo exporter gives both blocks' in-projections one (transposed) weight
    # tensor where they are equal? No: it shares a folded constant between them
    ("vit_mha", "dynamo"): ["norm"] * 2,
    ("llama", "ts"): LLAMA,
    ("llama", "dynamo"): LLAMA,
    ("llama_expand", "ts"): LLAMA,
    ("llama_expand", "dynamo"): LLAMA,
    # nn.RMSNorm: the TorchScript exporter cannot export aten::rms_norm
    ("llama_nn_rmsnorm", "dynamo"): LLAMA,
    ("bert", "ts"): [],
    ("bert", "dynamo"): [],
    ("convnext", "ts"): ["norm"] * 4,
    ("convnext", "dynamo"): ["norm"] * 4,
    # opset 16: no LayerNormalization, the TorchScript exporter writes it out
    ("vit", "ts16"): VIT,
    # opset 23: RMSNormalization
    ("llama_nn_rmsnorm", "dynamo23"): LLAMA,
}

# Refusals ``cle inspect -v`` must give, with (a part of) their reason.
REFUSED = {
    "vit": ["the MatMul sums over the channels", "opaque Gelu", "opaque Gather"],
    "llama": [
        "Unsqueeze",  # grouped-query attention: V heads repeated
        "multiplies by a constant that is not per channel",  # rotary: no Q -> K
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


@pytest.mark.parametrize(("variant", "exporter"), list(EXPECTED), ids="-".join)
def test_equalized_exactly_with_the_regions_expected(exported, variant, exporter):
    path, x = exported(variant, exporter)
    original = onnx.load(str(path))
    expected = _run(original, x)
    for objective in ("noise", "balance"):
        eq, report = cle_onnx.equalize_model(str(path), objective=objective)
        assert sqnr_db(expected, _run(eq, x)) >= 90, report.summary(verbose=True)
        kinds = [r.kind for r in report.regions]
        assert kinds == EXPECTED[variant, exporter], report.summary(verbose=True)
        if objective == "balance":
            # the balance has no range for a norm's affine: it leaves those regions
            scaled = [r for r in report.regions if np.any(np.asarray(r.scales) != 1)]
            assert all(r.kind != "norm" for r in scaled)
            refusals = [s.reason for s in report.skipped if "norm's affine" in s.reason]
            assert len(refusals) == kinds.count("norm")


def test_noise_objective_scales_the_norm_and_gated_regions(exported, monkeypatch):
    """Exact where scaling happens: the noise objective's threshold lowered so that it
    scales every region it finds on the untrained LLaMA."""
    from cle_core._objectives import noise

    monkeypatch.setattr(noise, "MIN_GAIN_DB", 0.0)
    path, x = exported("llama", "ts")
    eq, report = cle_onnx.equalize_model(str(path))
    spread = {r.kind: float(np.max(np.abs(np.log10(r.scales)))) for r in report.regions}
    assert spread["norm"] > 0.1 and spread["gated"] > 0.1, report.summary(verbose=True)
    assert sqnr_db(_run(onnx.load(str(path)), x), _run(eq, x)) >= 90


@pytest.mark.parametrize("variant", list(REFUSED))
def test_inspect_lists_the_regions_and_the_refusals(exported, variant, capsys):
    path, _ = exported(variant, "ts")
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  #\d+ ([\w-]+), \d+ channels:", out, flags=re.M)
    assert listed == EXPECTED[variant, "ts"], out
    for reason in REFUSED[variant]:
        assert reason in out, out


def test_calibrated_statistics_on_channel_last_values(exported):
    """``calibration=``: the statistics of token tensors ``(B, T, C)`` are per channel
    of the last axis (a wrong axis shows as a channel count the core refuses), and the
    result stays exact."""
    path, x = exported("vit", "ts")
    rng = np.random.default_rng(1)
    calibration = rng.standard_normal((8, *x.shape[1:])).astype(np.float32)
    model = onnx.load(str(path))
    axes = _channel_axes(None, model)
    stats = calibration_stats(model, calibration, axes)
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
