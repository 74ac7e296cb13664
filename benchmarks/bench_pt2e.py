"""Equalized models quantized by PyTorch's own deployment path: torchao's PT2E.

The other benchmarks measure onnxruntime's ``quantize_static``; PyTorch users deploy with
PT2E (``torch.export``, ``prepare_pt2e``, calibration, ``convert_pt2e``). Here the
quantizer is torchao's ``X86InductorQuantizer``: int8 symmetric weights per output
channel (its default) or per tensor (the same configuration with a per-tensor weight
spec), uint8 activations calibrated by its histogram observer. Each network is quantized

- ``none``: as given (PT2E folds the batch norms itself);
- ``balance``: equalized with ``objective="balance"`` (the paper's weight balance);
- ``ours``: equalized with the defaults told the deployment, this quantizer's placement
  included (``Deployment(quantizer="torchao-x86")`` for per-tensor weights, with
  ``per_channel=True`` for per-channel ones);
- ``ours(ort)``: the same, chosen for onnxruntime's placement instead (the default
  profile), to show what knowing the quantizer's grids is worth.

Printed: output SQNR in dB against the FP32 model (the converted model's reference
implementation: quantize / dequantize ops around float kernels, which is what the
backends compute up to kernel rounding), and ours - none, ours - balance. Networks: the
pretrained EfficientNet-Lite0 (120 natural images, 40 other crops calibrating) and the
small ReLU6 CNN of ``bench_other_networks.py`` trained on crops of the sample images
(3 seeds; 256 crops measured, 32 others calibrating). Lite0 takes about 2 minutes a
quantization on 2 cores (torch.export and the histogram observers), ~15 minutes in all.

Run: ``python benchmarks/bench_pt2e.py [--networks lite0 trained_cnn] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_other_networks as other  # noqa: E402

import cle_torch  # noqa: E402
from cle_core import Deployment  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402

BATCH = 8  # exported with a fixed batch; every input set here is a multiple of it


def quantizer(per_channel: bool):
    """torchao's x86 quantizer; per-tensor weights by swapping its weight spec only."""
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config()
    if not per_channel:
        weight = QuantizationSpec(
            dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=False,
            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
        )
        config = QuantizationConfig(
            config.input_activation, config.output_activation, weight, config.bias
        )
    return xiq.X86InductorQuantizer().set_global(config)


def mark_layers(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The sources recorded at export, made what the x86 quantizer can match.

    The quantizer finds its patterns by the source recorded for each node
    (``get_source_partitions``: ``nn.Conv2d`` / ``F.conv2d``, ``nn.ReLU6`` ...), one
    partition per module instance. EfficientNet-Lite's ``Conv2dStaticSamePadding`` is no
    ``nn.Conv2d`` and a ``torch.fx.GraphModule`` (what the backend returns when it cannot
    write onto the module tree) records no source, so all 49 convolutions would stay in
    float and only the classifier be quantized; and its ReLU6 modules are called at
    several places, which the quantizer refuses ("more than one output node"). Here every
    conv2d / linear names ``F.conv2d`` / ``F.linear`` and every node is its own
    partition: PT2E then quantizes every layer, as a deployment does."""
    layers = {
        torch.ops.aten.conv2d.default: torch.nn.functional.conv2d,
        torch.ops.aten.linear.default: torch.nn.functional.linear,
    }
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("source_fn_stack")
        # Without a recorded source the matcher falls back to the enclosing module,
        # which merges every call of a shared module again: the op itself is the source.
        source = layers.get(node.target, stack[-1][1] if stack else node.target)
        node.meta["source_fn_stack"] = [(node.name, source)]
    return graph


def batches(x: torch.Tensor):
    return (x[i : i + BATCH] for i in range(0, len(x), BATCH))


def pt2e_outputs(model, x: torch.Tensor, calib: torch.Tensor, per_channel: bool) -> np.ndarray:
    """``model`` quantized by PT2E, calibrated on ``calib``, run on ``x``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = mark_layers(torch.export.export(model.eval(), (calib[:BATCH],)).module())
        prepared = prepare_pt2e(graph, quantizer(per_channel))
        with torch.no_grad():
            for xb in batches(calib):
                prepared(xb)
        converted = convert_pt2e(prepared)
        with torch.no_grad():
            return np.concatenate([converted(xb).numpy() for xb in batches(x)])


def cases(name: str, seeds: int):
    """``(label, model, measured inputs, calibration inputs)``."""
    if name == "lite0":
        from cle_core._quality import calibration_images, natural_images
        from cle_torch._examples import efficientnet_lite0

        calib = torch.from_numpy(np.ascontiguousarray(calibration_images()))
        yield "lite0", efficientnet_lite0(), torch.from_numpy(natural_images().copy()), calib
        return
    for seed in range(seeds):
        model, x, _ = other.trained_cnn(seed=seed)
        yield f"trained_cnn/{seed}", model, x, other.crops(32, seed=3 + 10 * seed)[0]


def run_case(model, x, calib) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        reference = model.eval()(x).numpy()
    balance, _ = cle_torch.equalize_model(
        copy.deepcopy(model), dummy_input=x[:1], objective="balance"
    )
    rows = {}
    for label, per_channel in (("per-tensor", False), ("per-channel", True)):
        candidates = {"none": model, "balance": balance}
        for name, profile in (("ours", "torchao-x86"), ("ours_ort", "onnxruntime")):
            deployment = Deployment(per_channel=per_channel, quantizer=profile)
            candidates[name], _ = cle_torch.equalize_model(
                copy.deepcopy(model), dummy_input=x[:1], deployment=deployment
            )
        rows[label] = {
            name: sqnr_db(reference, pt2e_outputs(candidate, x, calib, per_channel))
            for name, candidate in candidates.items()
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=["lite0", "trained_cnn"])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the backend's notes on rewritten modules
    torch.manual_seed(0)
    print(
        f"{'network':<16} {'weights':<12} {'none':>7} {'balance':>8} {'ours':>7} "
        f"{'-none':>7} {'-balance':>9} {'ours(ort)':>10}"
    )
    for name in args.networks:
        for label, model, x, calib in cases(name, args.seeds):
            for weights, row in run_case(model, x, calib).items():
                print(
                    f"{label:<16} {weights:<12} {row['none']:7.2f} {row['balance']:8.2f} "
                    f"{row['ours']:7.2f} {row['ours'] - row['none']:+7.2f} "
                    f"{row['ours'] - row['balance']:+9.2f} {row['ours_ort']:10.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
