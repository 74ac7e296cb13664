"""Does an option that helps EfficientNet-Lite0 hurt other networks?

The rule for defaults: one changes only when it is better on Lite0 and no worse on the
other test networks. This runs the test suite's architectures (tests/torch_models.py:
random weights with per-channel ranges over three decades, random BN statistics), three
seeds each, 48 random inputs, and prints the mean simulated per-tensor W8 and W8A8
logits SQNR (dB, against FP32) after ``cle_torch.equalize_model`` with each setting.

Run: ``python benchmarks/bench_other_networks.py [--weights 0 0.2]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch_models as tm  # noqa: E402

import cle_torch  # noqa: E402
from cle_torch._quantsim import evaluate_torch  # noqa: E402

NETWORKS = ("mobilenet_v2", "resnet", "vgg", "grouped", "concat", "decoder", "functional")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=[0.0, 0.2],
        help="activation_weight values to compare",
    )
    args = ap.parse_args()
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    head = "".join(f"  aw={w:<4} W8 / W8A8 dB" for w in args.weights)
    print(f"{'network':<14}{head}")
    for name in NETWORKS:
        sums = {w: [] for w in args.weights}
        for seed in (0, 1, 2):
            model, shape = getattr(tm, name)(seed)
            x = torch.randn(48, *shape[1:])
            for w in args.weights:
                eq, _ = cle_torch.equalize_model(
                    copy.deepcopy(model), dummy_input=x[:1], activation_weight=w
                )
                r = evaluate_torch(model, eq, x.numpy())
                sums[w].append((r["w8_sqnr"], r["w8a8_sqnr"]))
        cells = "".join(
            f"  {np.mean([a for a, _ in sums[w]]):>9.2f} / {np.mean([b for _, b in sums[w]]):<9.2f}"
            for w in args.weights
        )
        print(f"{name:<14}{cells}")


if __name__ == "__main__":
    main()
