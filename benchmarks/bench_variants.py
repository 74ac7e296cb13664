"""Variants of the noise objective that were measured and not kept, reproducible.

Each mode answers one question with onnxruntime's figures (``bench_deployments.py``'s
measurement: TorchScript export, ``quantize_static`` for W8A8, weights-only grids for
W8):

- ``--range-sigmas K``: the data-free activation range is ``mean +- K sd`` (the library:
  4). Prints ``bench_deployments.py``'s table with that range (``--networks``).
- ``--activation-factor F``: every activation grid's term of the estimate times ``F``
  (``bench_estimate_layers.py`` measures those terms about 4.4 dB optimistic on Lite0:
  would weighing them more choose better?). Prints the same table.
- ``--coherent-fraction K``: each activation grid's rounding noise counted as if a
  fraction ``K`` of it were the same at every position (it then reaches the outputs
  through the uniform gain, undivided by the positions): smooth images round alike over
  large areas (see ``bench_estimate_layers.py --by-image``). Prints the same table.
- ``--offset-choice``: the default scales and ``--draws`` jittered copies of them
  (``bench_draws.py``'s ``exp(0.02 z)`` per channel, each an exact equalization); for
  each, the output offset the weights' rounding predicts data-free (the library's bias
  correction run on a copy: its per-layer shifts carried to the output by the
  propagated means, as a noise-to-signal ratio) added to the estimate; picks the draw
  with the lowest sum. Prints per network and deployment the undrawn, mean, picked and
  best measured SQNR, the rank correlation of predicted and measured over the draws, and
  means over the rows.
- ``--layers-add``: per-channel W8 on the trained CNN: each layer's weights alone on the
  grid (every other weight in float, PyTorch, symmetric int8 per output channel as
  onnxruntime rounds them) and all at once, for no scaling, the previous release's
  objective (``noise-v1``), the balance and the default: whether the measured
  differences between scales are in the layers' own errors (what the estimate models)
  or in how their errors add.

Run: ``python benchmarks/bench_variants.py --offset-choice [--networks resnet ...]
[--draws N] [--seeds N] [--deployments W8A8 W8 W8/ch]``, ``--range-sigmas 6``,
``--activation-factor 2.75``, ``--coherent-fraction 0.01``, ``--layers-add``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package
import _noise_v1  # noqa: E402
import bench_deployments as bd  # noqa: E402
import bench_draws as bdr  # noqa: E402

import cle_core._estimate as _estimate  # noqa: E402
import cle_core._gains as _gains  # noqa: E402
import cle_core._stats as _stats  # noqa: E402
import cle_torch  # noqa: E402
from cle_core import Deployment, register_objective  # noqa: E402
from cle_core._correct import correct_biases  # noqa: E402
from cle_core._objectives.noise import problem_estimate  # noqa: E402
from cle_core._scale import apply_scales  # noqa: E402
from cle_core.quality import weights_on_grid  # noqa: E402


class OffsetPredicted(bdr.Jittered):
    """:class:`bench_draws.Jittered`, also predicting the output offset of the rounding
    at the scales it returns (``offset``: noise-to-signal ratio, data-free)."""

    name = "offset-predicted-for-bench"
    offset = float("nan")

    def choose(self, problem):
        out = super().choose(problem)
        graph = problem.graph
        restore = graph.checkpoint()
        try:  # on the objective's own graph, put back below: nothing else sees it
            apply_scales(problem.regions, out.scales)
            before, _ = _stats.estimate(graph, {}, transpose_taps=True, correlated=True)
            options = dataclasses.replace(problem.options, bias_correction=True)
            correct_biases(graph, options, {}, {})
            after, _ = _stats.estimate(graph, {}, transpose_taps=True, correlated=True)
            names = [v.name for v in graph.outputs]
            shift = sum(float(np.sum((before[n].mean - after[n].mean) ** 2)) for n in names)
            self.offset = shift / sum(float(np.sum(before[n].meansq)) for n in names)
        finally:
            restore()
        return out


def ranks(x) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x))).astype(float)


def offset_choice(args) -> None:
    jitter = OffsetPredicted()
    register_objective(jitter)
    gains: dict[str, list[tuple[float, float, float]]] = {d: [] for d in args.deployments}
    print(f"{args.draws} draws of eps 0.02 per row; measured SQNR (dB)")
    for name in args.networks:
        for label, model, x, calib in bd.cases(name, args.seeds):
            original = bdr.exported(model, x)
            for dep in args.deployments:
                rows = []
                for d in range(args.draws + 1):
                    jitter.base, jitter.eps, jitter.seed = "noise", (0.0 if d == 0 else 0.02), d
                    sqnr = bdr.measured(jitter, model, x, calib, original, bd.DEPLOYMENTS[dep])
                    predicted = 10 ** (-jitter.estimated / 10) + jitter.offset
                    rows.append((sqnr, -10 * np.log10(jitter.offset), predicted))
                meas = np.array([r[0] for r in rows])
                pick = int(np.argmin([r[2] for r in rows]))
                rho = float(np.corrcoef(ranks(meas), ranks([-r[2] for r in rows]))[0, 1])
                gains[dep].append((meas[pick] - meas[0], meas[pick] - meas.mean(), rho))
                print(
                    f"{label:<16}{dep:<8}undrawn {meas[0]:6.2f}  mean {meas.mean():6.2f}  "
                    f"picked {meas[pick]:6.2f} (#{pick})  best {meas.max():6.2f}  rank corr "
                    f"{rho:+.2f}  predicted offset dB " + " ".join(f"{r[1]:.1f}" for r in rows),
                    flush=True,
                )
    for dep, g in gains.items():
        if g:
            a = [v[0] for v in g]
            print(
                f"  {dep:<8}{len(g):3d} rows: picked - undrawn mean {statistics.mean(a):+.2f} "
                f"(worst {min(a):+.2f}), picked - draws' mean "
                f"{statistics.mean(v[1] for v in g):+.2f}, rank corr mean "
                f"{statistics.mean(v[2] for v in g):+.2f}"
            )


class Fixed(bdr.Jittered):
    """:class:`bench_draws.Jittered` undrawn (no scaling, or another objective's scales),
    keeping the estimate's weight terms at the scales it returns."""

    name = "fixed-for-bench"
    description = "no scaling or another objective's scales"
    weight_terms: list = []

    def choose(self, problem):
        out = super().choose(problem)
        scales = [out.scales[r.id] for r in problem.regions]
        self.weight_terms = problem_estimate(problem).weight_values(scales)
        return out


def on_grid(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, onnxruntime's grid bit for bit."""
    return torch.from_numpy(weights_on_grid(w.numpy(), 8, True, axis=0)).to(w.dtype)


def layers_add(args) -> None:
    fixed = Fixed()
    register_objective(fixed)
    dep = Deployment(activation_bits=None, per_channel=True)

    def db(x: float) -> float:
        return -10.0 * np.log10(x)

    for label, model, x, _ in bd.cases("trained_cnn", args.seeds):
        print(label, " est / measured per layer (dB), the layers' sum, all at once")
        reference = None
        for base in (None, "noise-v1", "balance", "noise"):
            fixed.base = base
            eq, _ = cle_torch.equalize_model(
                copy.deepcopy(model), dummy_input=x[:1], objective=fixed.name, deployment=dep
            )
            eq.eval()
            with torch.no_grad():
                y = eq(x).double()
                reference = y if reference is None else reference
                power = float((reference**2).mean())
                kinds = (torch.nn.Conv2d, torch.nn.Linear)
                layers = [m for m in eq.modules() if isinstance(m, kinds)]
                alone = []
                for m in layers:
                    w = m.weight.data
                    m.weight.data = on_grid(w)
                    alone.append(float(((eq(x).double() - reference) ** 2).mean()) / power)
                    m.weight.data = w
                for m in layers:
                    m.weight.data = on_grid(m.weight.data)
                together = float(((eq(x).double() - reference) ** 2).mean()) / power
            print(
                f"  {base or 'none':<9}"
                + " ".join(
                    f"{db(e):4.1f}/{db(a):4.1f}"
                    for e, a in zip(fixed.weight_terms, alone, strict=True)
                )
                + f"   sum {db(sum(alone)):5.2f}  at once {db(together):5.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--range-sigmas", type=float)
    mode.add_argument("--activation-factor", type=float)
    mode.add_argument("--coherent-fraction", type=float)
    mode.add_argument("--offset-choice", action="store_true")
    mode.add_argument("--layers-add", action="store_true")
    ap.add_argument("--networks", nargs="+", default=["lite0", "trained_cnn"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument(
        "--deployments", nargs="+", default=["W8A8", "W8", "W8/ch"], choices=list(bd.DEPLOYMENTS)
    )
    args = ap.parse_args()
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    logging.getLogger("cle_core").setLevel(logging.ERROR)
    _noise_v1.register()
    if args.offset_choice:
        offset_choice(args)
        return
    if args.layers_add:
        layers_add(args)
        return
    if args.range_sigmas is not None:
        _stats.RANGE_SIGMAS = args.range_sigmas  # read at each use
    elif args.coherent_fraction is not None:
        kappa = args.coherent_fraction

        def rounding_gain(self, name, channels, positions):
            u = self.uniform.get(name)
            if u is None or u.shape[0] != channels:
                return np.full(channels, self.typical)
            # (one position: a weight's noise, or a vector: already all uniform)
            coherent = kappa * u if positions > 1 else 0.0
            gain = u / max(positions, 1) + coherent + self.fluctuating[name]
            return _gains.floored(gain, self.floor)

        _gains.Gains.rounding_gain = rounding_gain
    else:
        made = _estimate._activation_term

        def weighed(*a, **k):
            term = made(*a, **k)
            if term is not None:
                term.factor *= args.activation_factor
            return term

        _estimate._activation_term = weighed
    sys.argv = [sys.argv[0], "--networks", *args.networks, "--seeds", str(args.seeds)]
    _noise_v1.register = lambda: None  # registered above
    bd.main()


if __name__ == "__main__":
    main()
