"""How much of the measured quantized quality is one draw of the rounding.

Any positive scales leave the FP32 function unchanged, so the equalized scales times a
small random factor per channel (``exp(eps * z)``, ``z`` standard normal) are another
exact equalization with almost the same estimated noise but other rounding errors. For
each network and deployment this benchmark equalizes once (``none``: no scaling; the
default noise objective), then measures ``--draws`` such jittered copies with
onnxruntime (``cle_onnx.evaluate``: weights-only grids for W8, ``quantize_static`` for
W8A8, as ``bench_deployments.py``). It prints per draw set:

- the SQNR of each draw's own scales (min / median / max over the draws);
- the SQNR of the mean error power over the draws (what a variance estimate predicts);
- the share of the error power in per-output offsets (each output's error averaged
  over the evaluation inputs; a bias correction removes that part), mean over draws;
- the noise objective's estimate (data-free) of the undrawn scales and the mean of
  the draws' estimates (dB).

``--case-means`` instead prints, per deployment, the default scales' SQNR averaged over
``bench_deployments.py``'s 27 other cases, undrawn and for each draw: how far such a
mean moves by the rounding alone.

Run: ``python benchmarks/bench_draws.py [--networks ...] [--draws N] [--eps E]``, or
``python benchmarks/bench_draws.py --case-means --draws 3``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package
import bench_deployments as bd  # noqa: E402
import bench_other_networks as other  # noqa: E402

import cle_torch  # noqa: E402
from cle_core import Deployment, ScaleOutcome, objective_names, register_objective  # noqa: E402
from cle_core._objectives import get_objective  # noqa: E402
from cle_core._objectives.noise import problem_estimate  # noqa: E402
from cle_core._scale import drawn_scales  # noqa: E402
from cle_onnx._evaluate import prepared, run, static_quantized, weights_quantized  # noqa: E402


class Jittered:
    """The scales of ``base`` (an objective's name, or None: no scaling) times
    ``exp(eps * z)`` per channel; ``seed`` picks the draw."""

    name = "jittered-for-bench"
    description = "another objective's scales, jittered"
    base: str | None = None
    eps, seed = 0.0, 0
    estimated = float("nan")  # the estimate's SQNR (dB) of the last scales chosen

    def choose(self, problem):
        if self.base is None:
            out = ScaleOutcome({r.id: np.ones(r.size) for r in problem.regions}, 0, True, 0.0)
        else:
            out = get_objective(self.base).choose(problem)
        # the library's draw (scale_draw), at this spread
        out.scales = drawn_scales(problem.regions, out.scales, self.seed, self.eps)
        total = problem_estimate(problem).total([out.scales[r.id] for r in problem.regions])
        self.estimated = -10.0 * np.log10(total)
        return out


def exported(model, x):
    """The ONNX export, its progress messages kept off the table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return other.exported(model, x)


def errors(original, candidate, x, calib, dep: Deployment) -> np.ndarray:
    """The candidate's quantized output minus the FP32 original's, on ``x``."""
    ready = prepared(candidate)
    if dep.weights_only:
        q = weights_quantized(ready, dep.weight_bits, dep.per_channel, dep.weight_symmetric)
    else:
        q = static_quantized(ready, calib, deployment=dep)
    ref = run(original, x)
    return (run(q, x) - ref).reshape(len(ref), -1), ref.reshape(len(ref), -1)


def db(signal: float, noise: float) -> float:
    return 10.0 * np.log10(signal / noise)


def measured(jitter: Jittered, model, x, calib, original, dep: Deployment) -> float:
    """The SQNR (dB) of ``model`` equalized with ``jitter``'s scales, quantized for ``dep``."""
    eq, _ = cle_torch.equalize_model(
        copy.deepcopy(model), dummy_input=x[:1], objective=jitter.name, deployment=dep
    )
    err, ref = errors(original, exported(eq, x), x.numpy(), calib, dep)
    return db(float(np.sum(ref**2)), float(np.sum(err**2)))


def case_means(jitter: Jittered, draws: int, eps: float, deployments) -> None:
    """Per deployment, the mean over the 27 cases of the default scales' SQNR, undrawn
    (bench_deployments.py's figure) and for each draw."""
    figures = {dep: [] for dep in deployments}
    jitter.base = "noise"
    for name in ["trained_cnn", *other.RANDOM]:
        for label, model, x, calib in bd.cases(name, 3):
            original = exported(model, x)
            for dep in deployments:
                row = []
                for d in range(draws + 1):
                    jitter.eps, jitter.seed = (0.0 if d == 0 else eps), d
                    row.append(measured(jitter, model, x, calib, original, bd.DEPLOYMENTS[dep]))
                figures[dep].append(row)
                print(f"{label:<16}{dep:<8}" + "".join(f"{v:7.2f}" for v in row), flush=True)
    print(f"means over the cases, undrawn then {draws} draws of eps {eps}:")
    for dep, rows in figures.items():
        means = np.mean(rows, axis=0)
        print(
            f"  {dep:<8}" + "".join(f"{m:7.2f}" for m in means) + f"   spread {np.ptp(means):.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=["lite0", "trained_cnn", "resnet"])
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument(
        "--deployments", nargs="+", default=["W8", "W8A8"], choices=list(bd.DEPLOYMENTS)
    )
    ap.add_argument(
        "--case-means",
        action="store_true",
        help="instead: the means over bench_deployments.py's 27 other cases, per draw of "
        "the default scales (how far one run's means move by the rounding alone)",
    )
    args = ap.parse_args()
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    logging.getLogger("cle_core").setLevel(logging.ERROR)
    jitter = Jittered()
    if jitter.name not in objective_names():
        register_objective(jitter)
    if args.case_means:
        case_means(jitter, args.draws, args.eps, args.deployments)
        return
    print(f"eps {args.eps}, {args.draws} draws per row")
    print(
        f"{'network':<16}{'deploy':<7}{'scales':<7}{'min':>7}{'median':>8}{'max':>7}"
        f"{'mean-power':>11}{'undrawn':>9}{'offset':>8}{'est':>7}{'est drawn':>10}"
    )
    for name in args.networks:
        for label, model, x, calib in bd.cases(name, args.seeds):
            original = exported(model, x)
            xs = x.numpy()
            for dep_name in args.deployments:
                dep = bd.DEPLOYMENTS[dep_name]
                for base in (None, "noise"):
                    jitter.base = base
                    rows = []
                    for d in range(args.draws + 1):  # draw 0: no jitter
                        jitter.eps, jitter.seed = (0.0 if d == 0 else args.eps), d
                        eq, report = cle_torch.equalize_model(
                            copy.deepcopy(model),
                            dummy_input=x[:1],
                            objective=jitter.name,
                            deployment=dep,
                        )
                        err, ref = errors(original, exported(eq, x), xs, calib, dep)
                        power = float(np.sum(err**2))
                        offset = float(len(err) * np.sum(err.mean(axis=0) ** 2))
                        rows.append((power, offset / power, jitter.estimated))
                        signal = float(np.sum(ref**2))
                    drawn = np.array([db(signal, p) for p, _, _ in rows[1:]])
                    mean_power = db(signal, np.mean([p for p, _, _ in rows[1:]]))
                    share = np.mean([s for _, s, _ in rows[1:]])
                    est = np.array([e for _, _, e in rows])
                    print(
                        f"{label:<16}{dep_name:<7}{base or 'none':<7}{drawn.min():7.2f}"
                        f"{np.median(drawn):8.2f}{drawn.max():7.2f}{mean_power:11.2f}"
                        f"{db(signal, rows[0][0]):9.2f}{share:8.2f}"
                        f"{est[0]:7.2f}{np.mean(est[1:]):10.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
