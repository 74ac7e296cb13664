"""``cle equalize`` on a large ONNX file: a VGG-11 export (133 M parameters, 531 MB).

Builds torchvision's VGG-11 architecture (written here: torchvision does not import beside
this torch) with PyTorch's default initialization, exports it with the TorchScript
exporter (opset 13, weights inside the file) and prints, for the default (noise
objective, W8A8) and ``--objective balance``:

- the wall time of ``cle equalize IN -o OUT`` file to file, each run in a fresh Python
  process (imports included, as a user runs it), median and range of ``--repeat`` runs;
- the peak resident memory of that process (``ru_maxrss``).

The issue this answers (#18) measured 24.7 s for the default on such an export. The
weights are random: the default's estimate finds nothing to gain and scales nothing;
the balance scales every pair, so both the estimate's set-up and the write of changed
weights are timed.

Run: ``python benchmarks/bench_large_file.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# One child process per run: its own peak memory, printed after the run.
_CHILD = """
import resource, sys
from cle_core._cli import main
rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak GB (ru_maxrss) of ``cle`` with ``argv`` in a fresh process."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - t0
    kb, rc = out.stdout.split()[-2:]
    if rc != "0":
        raise SystemExit(f"cle {' '.join(argv)} exited {rc}:\n{out.stderr}")
    return seconds, int(kb) * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = VGG11().eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "vgg11.onnx", Path(tmp) / "vgg11_cle.onnx"
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 224, 224),),
            str(src),
            opset_version=13,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
        size = src.stat().st_size / 1e6
        print(f"VGG-11: {params / 1e6:.1f} M parameters, {size:.0f} MB file")
        for label, extra in (
            ("default (noise, W8A8)", []),
            ("--objective balance", ["--objective", "balance"]),
        ):
            argv = ["equalize", str(src), "-o", str(dst), "--quiet", *extra]
            runs = [run_once(argv) for _ in range(args.repeat)]
            times, peaks = [r[0] for r in runs], [r[1] for r in runs]
            print(
                f"{label:<24} median {statistics.median(times):.2f} s "
                f"({min(times):.2f}-{max(times):.2f}, {args.repeat} runs), "
                f"peak {max(peaks):.2f} GB"
            )
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB peak)")


if __name__ == "__main__":
    main()
