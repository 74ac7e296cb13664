"""Core-only benchmark: equalize a synthetic network of inverted-residual blocks.

A 3x3 stem, then blocks of expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1
-> BN -> residual Add (three layers a block), then a 1x1 head. The default, 100 blocks of width 144
and expansion 6, is 302 layers and about 25.7 M float32 parameters. Weights are He-scaled and
each BN's variance is near its gamma squared (as in trained networks), so that activations
neither vanish nor explode over 300 layers.

It prints, for the default (noise objective, W8A8) and for ``objective="balance"``:
- the wall time of the full ``equalize`` (fold + scale + absorb), median of ``--repeat``
  runs, each on a fresh copy of the graph;
- the floor: one in-place NumPy multiply over every weight array, measured in the same
  run, and the ratio of the two (target: within 60x);
- the peak memory that ``equalize`` allocates beyond the weights, from tracemalloc
  (target: under 1x the weight bytes);
- the same wall time on a network one tenth as deep, and the ratio (target: linear, 10x
  the layers costs no more than 12x the time).

Run: ``python benchmarks/bench_core.py`` (``--blocks``, ``--width``, ``--repeat``).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import tracemalloc

import numpy as np

from cle_core import EqualizeOptions, Graph, Layout, equalize


def build(blocks: int, width: int, expansion: int = 6, seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    g = Graph("synthetic")
    g.add_input("x", 3)

    def bn(inp: str, name: str, c: int) -> str:
        gamma = rng.normal(size=c) * np.exp(rng.uniform(-2, 2, c))
        g.add_node(
            "batchnorm",
            [inp],
            name=name,
            outputs=[name],
            params={
                "mean": rng.normal(size=c).astype(f32),
                # Trained BNs divide by about their input's spread: the folded scale
                # gamma / sqrt(var) spreads over a decade around 1, as it does in trained
                # networks, instead of compounding over 300 layers.
                "var": (gamma**2 * np.exp(rng.uniform(-2, 2, c))).astype(f32),
                "gamma": gamma.astype(f32),
                "beta": rng.normal(size=c).astype(f32),
            },
            attrs={"eps": 1e-5},
        )
        return name

    def conv(inp: str, name: str, cin: int, cout: int, k: int = 1, groups: int = 1) -> str:
        # He-scaled, as trained networks roughly are: unit-variance weights would grow
        # the signal ~30x a layer, to 1e300 and beyond over 300 layers.
        fan_in = cin // groups * k * k
        w = rng.standard_normal((cout, cin // groups, k, k), dtype=f32) * f32(
            math.sqrt(2.0 / fan_in)
        )
        pad = (k // 2,) * 4
        g.add_node(
            "conv",
            [inp],
            name=name,
            outputs=[name],
            params={"weight": w, "bias": None},
            attrs={"layout": Layout(0, 1, groups), "pads": pad},
        )
        return name

    def relu6(inp: str, name: str) -> str:
        g.add_node(
            "clip",
            [inp],
            name=name,
            outputs=[name],
            params={"lo": np.array(0.0), "hi": np.array(6.0)},
        )
        return name

    h = bn(conv("x", "stem", 3, width, 3), "stem.bn", width)
    wide = width * expansion
    for i in range(blocks):
        e = relu6(bn(conv(h, f"b{i}.expand", width, wide), f"b{i}.bn1", wide), f"b{i}.act1")
        d = conv(e, f"b{i}.dw", wide, wide, 3, wide)
        d = relu6(bn(d, f"b{i}.bn2", wide), f"b{i}.act2")
        p = bn(conv(d, f"b{i}.project", wide, width), f"b{i}.bn3", width)
        g.add_node("add", [h, p], name=f"b{i}.add", outputs=[f"b{i}.add"])
        h = f"b{i}.add"
    g.add_node(
        "conv",
        [h],
        name="head",
        outputs=["y"],
        params={"weight": rng.standard_normal((width, width, 1, 1), dtype=f32), "bias": None},
    )
    g.set_outputs(["y"])
    return g


def weights_of(g: Graph) -> list[np.ndarray]:
    return [n.weight for n in g.nodes if n.is_layer]


def floor_time(g: Graph, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        arrays = weights_of(g)
        t0 = time.perf_counter()
        for w in arrays:
            np.multiply(w, np.float32(1.0), out=w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def equalize_time(blocks: int, width: int, repeat: int, options: EqualizeOptions):
    times, report = [], None
    for _ in range(repeat):
        g = build(blocks, width)
        gc.collect()
        t0 = time.perf_counter()
        report = equalize(g, options).report
        times.append(time.perf_counter() - t0)
    return statistics.median(times), report


def peak_beyond_weights(blocks: int, width: int, options: EqualizeOptions) -> tuple[int, int]:
    # Trace from before the build, so that weights replaced during equalize count as
    # freed; the peak over the post-build level is then what equalize adds.
    tracemalloc.start()
    g = build(blocks, width)
    weight_bytes = sum(n.weight.nbytes for n in g.nodes if n.is_layer)
    gc.collect()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    equalize(g, options)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base, weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=100)
    ap.add_argument("--width", type=int, default=144)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    g = build(args.blocks, args.width)
    layers = sum(n.is_layer for n in g.nodes)
    params = sum(n.weight.size for n in g.nodes if n.is_layer)
    floor = floor_time(g, max(5, args.repeat))
    del g
    print(f"network: {layers} layers, {params / 1e6:.1f} M float32 parameters")
    print(f"floor (in-place multiply over all weights): {floor * 1e3:.1f} ms")

    small_blocks = max(1, args.blocks // 10)
    for label, options in (
        ("default (noise, W8A8)", EqualizeOptions()),
        ("objective='balance'", EqualizeOptions(objective="balance")),
    ):
        t_full, report = equalize_time(args.blocks, args.width, args.repeat, options)
        t_small, _ = equalize_time(small_blocks, args.width, max(5, args.repeat), options)
        peak, weight_bytes = peak_beyond_weights(args.blocks, args.width, options)
        print(f"{label}:")
        print(
            f"  regions: {len(report.regions)}, sweeps: {report.sweeps} "
            f"({'converged' if report.converged else 'NOT converged'}, "
            f"max change {report.max_change:.1e})"
        )
        print(f"  equalize: {t_full * 1e3:.1f} ms = {t_full / floor:.1f}x floor (target <= 60x)")
        print(
            f"  peak memory beyond weights: {peak / 2**20:.1f} MiB = "
            f"{peak / weight_bytes:.2f}x weight bytes ({weight_bytes / 2**20:.1f} MiB, "
            "target < 1x)"
        )
        print(
            f"  depth scaling: {small_blocks * 3} layers {t_small * 1e3:.1f} ms, {layers} "
            f"layers {t_full * 1e3:.1f} ms, ratio {t_full / t_small:.1f} for "
            f"{layers / (small_blocks * 3):.0f}x the layers (target <= 12)"
        )


if __name__ == "__main__":
    main()
