"""The noise objective: estimated quantization noise as a function of log-scales, and
the exact solver of one region's subproblem. Pure functions on arrays.

One region has channels ``j = 0 .. n-1`` with log-scales ``t`` (scale ``s = exp(t)``).
Every layer or quantized activation that touches the region contributes one *term*

    w * exp(2 * max_j (alpha_j + sigma * t_j)) * sum_j c_j * exp(-2 * sigma * t_j)

- a layer that reads the region (a sink, ``sigma = +1``): its per-tensor weight step is
  proportional to ``max_j range_j * s_j`` (``alpha_j`` = log of input column ``j``'s
  range, over the layer's fixed output scales) and its noise, in the units in which the
  FP32 function is unchanged, grows with ``sum_j c_j / s_j**2``;
- a layer that writes the region (a source) and a quantized activation of the region
  (``sigma = -1``): step ``max_j range_j / s_j``, noise ``sum_j c_j * s_j**2``.

Each term is log-convex in ``t`` (``2 max(affine) + logsumexp(affine)``), so the sum is
convex. It is minimized exactly through its epigraph form: one variable ``mu_k`` per
term bounds the max (``alpha_kj + sigma_k * t_j <= mu_k``), which leaves a smooth
sum of exponentials under linear constraints. A log-barrier Newton method solves it;
each Newton system is reduced to the ``K`` term variables by eliminating the diagonal
channel block (a Schur complement), so a step costs ``O(K * n + K**3)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# |log-scale change| allowed in one solve: a factor of 10^4. A channel on which the
# objective is flat (a row of zeros, say) stays within it rather than running off.
_T_BOUND = math.log(1e4)
_MAX_NEWTON = 60


@dataclass(frozen=True)
class Terms:
    """The terms of one region, stacked: ``K`` terms over ``n`` channels.

    ``sign`` (K,): +1 for terms whose step grows with the scales (sinks), -1 otherwise.
    ``logw`` (K,): log of each term's constant factor. ``alpha`` (K, n): log-ranges,
    ``-inf`` where the term does not bound channel ``j``. ``logc`` (K, n): log of the
    noise coefficients, ``-inf`` where zero.
    """

    sign: np.ndarray
    logw: np.ndarray
    alpha: np.ndarray
    logc: np.ndarray

    @property
    def size(self) -> int:
        return self.alpha.shape[1]


def term_values(terms: Terms, t: np.ndarray) -> np.ndarray:
    """Each term's value at log-scales ``t`` (exact, no smoothing). Shape (K,)."""
    sign = terms.sign[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(np.where(np.isfinite(terms.alpha), terms.alpha + sign * t, -np.inf), axis=1)
        m = np.where(np.isfinite(m), m, 0.0)
        expo = terms.logc - 2.0 * sign * t
        top = np.max(np.where(np.isfinite(expo), expo, -np.inf), axis=1)
        top = np.where(np.isfinite(top), top, 0.0)
        s = np.sum(np.exp(expo - top[:, None]), axis=1)
    with np.errstate(divide="ignore"):
        return np.exp(terms.logw + 2.0 * m + top + np.log(s))


def objective(terms: Terms, t: np.ndarray) -> float:
    """The region's objective: the sum of its terms at ``t``."""
    return float(np.sum(term_values(terms, t)))


def solve(terms: Terms, t0: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
    """Log-scales minimizing ``objective(terms, t)``; ``t0`` is the start and fixes the
    gauge (the channels the terms touch keep their mean). Stops when the duality gap, a bound on the
    distance to the optimum, is below ``tolerance`` times the objective. Channels no
    term touches keep ``t0``; the result is never worse than ``t0``.

    Method: the epigraph form (one variable ``mu_k`` per term bounding its max) is a
    sum of exponentials under linear constraints, solved by a primal-dual interior-point
    method with Mehrotra's predictor-corrector. Each constraint couples one channel
    with one term, so every Newton system reduces to ``K x K`` (a Schur complement over
    the diagonal channel block): a step costs ``O(K n + K^3)``.
    """
    t0 = np.asarray(t0, dtype=np.float64)
    # A term with no range or no noise on the region adds nothing here.
    keep = np.any(np.isfinite(terms.alpha), axis=1) & np.any(np.isfinite(terms.logc), axis=1)
    terms = Terms(terms.sign[keep], terms.logw[keep], terms.alpha[keep], terms.logc[keep])
    active = np.any(np.isfinite(terms.alpha), axis=0) | np.any(np.isfinite(terms.logc), axis=0)
    if terms.alpha.shape[0] == 0 or not np.any(active):
        return t0.copy()
    idx = np.flatnonzero(active)
    sub = Terms(
        np.asarray(terms.sign, np.float64),
        np.asarray(terms.logw, np.float64),
        np.asarray(terms.alpha, np.float64)[:, idx],
        np.asarray(terms.logc, np.float64)[:, idx],
    )
    f0 = objective(sub, t0[idx])
    if not np.isfinite(f0) or f0 <= 0:
        return t0.copy()
    with np.errstate(all="ignore"):  # a degenerate step is caught below, not warned about
        t = _interior_point(sub, t0[idx], f0, tolerance)
    result = t0.copy()
    result[idx] = t - (np.mean(t) - np.mean(t0[idx]))  # the same gauge as the start
    if not np.all(np.isfinite(result)) or not objective(terms, result) <= objective(terms, t0):
        return t0.copy()
    return result


def _interior_point(terms: Terms, t0: np.ndarray, f0: float, tolerance: float) -> np.ndarray:
    return _PrimalDual(terms, t0, f0).run(tolerance)


def _ratio(x: np.ndarray, dx: np.ndarray) -> float:
    """The largest ``a`` with ``x + a dx >= 0`` everywhere (``x > 0``)."""
    return float(np.min(np.where(dx < 0, x / -np.minimum(dx, -1e-300), np.inf)))


class _PrimalDual:
    """A primal-dual interior-point method (Mehrotra's predictor-corrector) for the
    epigraph form: minimize ``sum_kj exp(logwc_kj + 2 mu_k - 2 sigma_k t_j)`` subject to
    ``alpha_kj + sigma_k t_j <= mu_k`` (where supported) and a box on ``t``."""

    def __init__(self, terms: Terms, t0: np.ndarray, f0: float):
        self.sk = terms.sign[:, None]
        k, n = terms.alpha.shape
        self.sup = np.isfinite(terms.alpha)
        self.alpha = np.where(self.sup, terms.alpha, 0.0)
        has_c = np.isfinite(terms.logc)
        # log(w_k c_kj), scaled so that the objective is about 1 at the start
        self.logwc = np.where(
            has_c, terms.logw[:, None] + np.where(has_c, terms.logc, 0.0) - math.log(f0), -np.inf
        )
        self.lo_box, self.hi_box = t0 - _T_BOUND, t0 + _T_BOUND
        self.fixed = np.zeros(k, bool)
        self.fixed[0] = True  # the objective is flat along a common shift of all scales
        self.m = int(self.sup.sum()) + 2 * n
        self.t = t0.copy()
        mu = np.max(np.where(self.sup, self.alpha + self.sk * self.t, -np.inf), axis=1)
        self.mu = np.where(np.isfinite(mu), mu, 0.0) + 0.1
        self.e, self.s, self.sl, self.sh = self.state(self.t, self.mu)
        nu = max(float(self.e.sum()), 1e-3) / self.m
        self.lam = np.where(self.sup, nu / self.s, 0.0)
        self.lam_l, self.lam_h = nu / self.sl, nu / self.sh

    def state(self, t, mu):
        """Exponentials and slacks at ``(t, mu)``."""
        e = np.exp(np.minimum(self.logwc + 2.0 * mu[:, None] - 2.0 * self.sk * t, 700.0))
        # slacks stay positive in exact arithmetic; rounding must not make them 0
        s = np.where(self.sup, np.maximum(mu[:, None] - self.sk * t - self.alpha, 1e-300), np.inf)
        return e, s, np.maximum(t - self.lo_box, 1e-300), np.maximum(self.hi_box - t, 1e-300)

    def run(self, tolerance: float) -> np.ndarray:
        sup, sk = self.sup, self.sk
        for _ in range(80):
            e, s, sl, sh = self.e, self.s, self.sl, self.sh
            f = float(e.sum())
            if not np.isfinite(f):
                break
            gap = float(
                (self.lam * np.where(sup, s, 0.0)).sum()
                + (self.lam_l * sl).sum()
                + (self.lam_h * sh).sum()
            )
            self.grad_t = -2.0 * (sk * e).sum(axis=0)
            self.grad_mu = 2.0 * e.sum(axis=1)
            if gap <= tolerance * f and self.stationary(f):
                break
            self.factor()
            pred = self.direction(0.0, 0.0, 0.0, 0.0)
            d_t, ds, a = pred[0], pred[2], pred[6]
            gap_aff = float(
                ((self.lam + a * pred[3]) * np.where(sup, s + a * ds, 0.0)).sum()
                + ((self.lam_l + a * pred[4]) * (sl + a * d_t)).sum()
                + ((self.lam_h + a * pred[5]) * (sh - a * d_t)).sum()
            )
            sigma = min(1.0, (gap_aff / gap) ** 3)
            d_t, d_mu, ds, dlam, dlam_l, dlam_h, a = self.direction(
                sigma * gap / self.m,
                np.where(sup, ds * pred[3], 0.0),
                d_t * pred[4],
                -d_t * pred[5],
            )
            a *= 0.99
            # The objective is not quadratic: shorten a step whose linearization is poor.
            while a > 1e-12:
                new = self.state(self.t + a * d_t, self.mu + a * d_mu)
                if float(new[0].sum()) <= f + 2.0 * gap + 1e-12:
                    break
                a *= 0.5
            else:
                break
            self.t, self.mu = self.t + a * d_t, self.mu + a * d_mu
            self.e, self.s, self.sl, self.sh = new
            self.lam = np.where(sup, np.maximum(self.lam + a * dlam, 1e-300), 0.0)
            self.lam_l = np.maximum(self.lam_l + a * dlam_l, 1e-300)
            self.lam_h = np.maximum(self.lam_h + a * dlam_h, 1e-300)
        return self.t

    def stationary(self, f: float) -> bool:
        r_t = self.grad_t + (self.sk * self.lam).sum(axis=0) - self.lam_l + self.lam_h
        r_mu = np.where(self.fixed, 0.0, self.grad_mu - self.lam.sum(axis=1))
        return float(r_t @ r_t + r_mu @ r_mu) <= 1e-12 * max(1.0, f * f)

    def factor(self) -> None:
        """The Newton matrix, reduced to the term variables (a Schur complement over the
        diagonal channel block)."""
        self.d = self.lam / self.s  # 0 where unsupported (s = inf)
        w = 4.0 * self.e + self.d
        self.d_l, self.d_h = self.lam_l / self.sl, self.lam_h / self.sh
        self.h_tt = w.sum(axis=0) + self.d_l + self.d_h
        self.h_tm = np.where(self.fixed[:, None], 0.0, -self.sk * w)  # d2 / (dmu_k dt_j)
        self.scaled = self.h_tm / self.h_tt
        self.schur = np.diag(np.where(self.fixed, 1.0, w.sum(axis=1))) - self.scaled @ self.h_tm.T

    def direction(self, target, corr, corr_l, corr_h):
        """Newton step towards ``lam * slack = target`` (less a second-order correction)
        and the longest step that keeps slacks and multipliers positive."""
        sup, sk, s, sl, sh = self.sup, self.sk, self.s, self.sl, self.sh
        c = np.where(sup, (target - corr) / s, 0.0)
        c_l, c_h = (target - corr_l) / sl, (target - corr_h) / sh
        rhs_t = -(self.grad_t + (sk * c).sum(axis=0) - c_l + c_h)
        rhs_mu = np.where(self.fixed, 0.0, c.sum(axis=1) - self.grad_mu)
        try:
            d_mu = np.linalg.solve(self.schur, rhs_mu - self.scaled @ rhs_t)
        except np.linalg.LinAlgError:
            d_mu = np.linalg.lstsq(self.schur, rhs_mu - self.scaled @ rhs_t, rcond=None)[0]
        d_t = (rhs_t - self.h_tm.T @ d_mu) / self.h_tt
        ds = d_mu[:, None] - sk * d_t
        dlam = np.where(sup, (target - corr) / s - self.lam - self.d * ds, 0.0)
        dlam_l = (target - corr_l) / sl - self.lam_l - self.d_l * d_t
        dlam_h = (target - corr_h) / sh - self.lam_h + self.d_h * d_t
        a = min(
            1.0,
            _ratio(np.where(sup, s, 1.0), np.where(sup, ds, 0.0)),
            _ratio(sl, d_t),
            _ratio(sh, -d_t),
            _ratio(np.where(sup, self.lam, 1.0), dlam),
            _ratio(self.lam_l, dlam_l),
            _ratio(self.lam_h, dlam_h),
        )
        return d_t, d_mu, ds, dlam, dlam_l, dlam_h, a
