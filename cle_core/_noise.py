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
from typing import NamedTuple

import numpy as np

# |log-scale change| allowed in one solve: a factor of 10^4. A channel on which the
# objective is flat (a row of zeros, say) stays within it rather than running off.
_T_BOUND = math.log(1e4)

# The interior point's constants.
# Fraction of the longest step that keeps every slack and multiplier positive: the
# usual interior-point margin, so that none of them lands on 0 exactly.
_STEP_FRACTION = 0.99
# Halvings of a step whose objective rises too much before it is given up (0.5**45 is
# about 3e-14 of the step: below it, the iterate would not move in float64).
_MAX_HALVINGS = 45
# A step is accepted while the region's objective stays below this factor of its value
# plus this many duality gaps: the objective is not quadratic and may rise a little on
# the way to the optimum (the epigraph variables and the barrier move with it).
_RISE_FACTOR, _RISE_GAPS = 1.1, 2.0
# Regions that are done leave the batch once they hold this share of its channels:
# dropping them costs a copy of every array, worth it only when it spares many.
_DROP_SHARE = 0.2
# Restarts of a region whose step length fell to 0 before its test passed: its slacks
# reached 0 while its dual residual did not (the barrier was lowered too fast along a
# flat direction), and d = lam / s then swamps its Newton system, which returns no
# step. Started afresh from where it stalled it goes on to the minimum (test
# test_a_stalled_solve_is_restarted_to_the_minimum). A solve that does not stall is
# not affected.
_RESTARTS = 2
# Smallest slack or multiplier: they stay positive in exact arithmetic, and rounding
# must not make them 0 (a division by them follows).
_TINY = 1e-300
# Largest exponent taken: exp(700) is near float64's largest value (exp(709.8)), so a
# wild trial step gives a huge but finite objective (rejected by the line search)
# rather than inf.
_MAX_EXP = 700.0


class _Step(NamedTuple):
    """A Newton direction of :class:`_PrimalDual` and its step lengths.

    ``d_t`` (N,): log-scales; ``d_mu`` (K, R): term variables; ``ds`` (K, N): the
    constraints' slacks; ``dlam`` (K, N): their multipliers; ``dlam_l``, ``dlam_h`` (N,):
    the multipliers of the box's lower and upper bounds; ``a`` (R,): per region, the
    longest step (at most 1) that keeps every slack and multiplier positive (0 for a
    region whose Newton system could not be solved).
    """

    d_t: np.ndarray
    d_mu: np.ndarray
    ds: np.ndarray
    dlam: np.ndarray
    dlam_l: np.ndarray
    dlam_h: np.ndarray
    a: np.ndarray


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
        # a term with no range on the region (all its weights are 0) adds no noise
        m = np.max(np.where(np.isfinite(terms.alpha), terms.alpha + sign * t, -np.inf), axis=1)
        expo = terms.logc - 2.0 * sign * t
        top = np.max(np.where(np.isfinite(expo), expo, -np.inf), axis=1)
        top = np.where(np.isfinite(top), top, 0.0)
        s = np.sum(np.exp(expo - top[:, None]), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(m), np.exp(terms.logw + 2.0 * m + top + np.log(s)), 0.0)


def objective(terms: Terms, t: np.ndarray) -> float:
    """The region's objective: the sum of its terms at ``t``."""
    return float(np.sum(term_values(terms, t)))


def solve(terms: Terms, t0: np.ndarray, tolerance: float = 1e-5) -> np.ndarray:
    """Log-scales minimizing ``objective(terms, t)``; ``t0`` is the start and fixes the
    gauge (the channels the terms touch keep their mean). Stops when the duality gap, a
    bound on the distance to the optimum, is below ``tolerance`` times the objective.
    Channels no term touches keep ``t0``; the result is never worse than ``t0``. The box
    is taken in the method's own gauge (the first term variable held), and the result
    then shifted to ``t0``'s mean: over 5378 random regions, 8 ended more than 1e-5
    above the minimum within ``t0``'s box, 6 of them with the minimum outside it
    (``test_a_solve_stops_at_its_own_gauges_box``).

    Method: the epigraph form (one variable ``mu_k`` per term bounding its max) is a
    sum of exponentials under linear constraints, solved by a primal-dual interior-point
    method with Mehrotra's predictor-corrector. Each constraint couples one channel
    with one term, so every Newton system reduces to ``K x K`` (a Schur complement over
    the diagonal channel block): a step costs ``O(K n + K^3)``.
    """
    return solve_many([terms], [t0], tolerance)[0]


def solve_many(
    problems: list[Terms],
    starts: list[np.ndarray],
    tolerance: float = 1e-5,
    max_steps: int = 80,
) -> list[np.ndarray]:
    """:func:`solve` for several independent regions at once: one interior-point run
    over all of them, each with its own step lengths and stopping test, so that many
    small regions cost about as much as one. ``max_steps`` bounds the Newton steps (an
    inexact solve is still never worse than its start)."""
    results = [np.asarray(t0, dtype=np.float64).copy() for t0 in starts]
    batch = []
    for i, (terms, t0) in enumerate(zip(problems, results, strict=True)):
        # A term with no range or no noise on the region adds nothing.
        keep = np.any(np.isfinite(terms.alpha), axis=1) & np.any(np.isfinite(terms.logc), axis=1)
        terms = Terms(terms.sign[keep], terms.logw[keep], terms.alpha[keep], terms.logc[keep])
        active = np.any(np.isfinite(terms.alpha), axis=0) | np.any(np.isfinite(terms.logc), axis=0)
        if terms.alpha.shape[0] == 0 or not np.any(active):
            continue
        idx = np.flatnonzero(active)
        sub = Terms(
            np.asarray(terms.sign, np.float64),
            np.asarray(terms.logw, np.float64),
            np.asarray(terms.alpha, np.float64)[:, idx],
            np.asarray(terms.logc, np.float64)[:, idx],
        )
        f0 = objective(sub, t0[idx])
        if np.isfinite(f0) and f0 > 0:
            batch.append((i, terms, sub, idx, f0))
    if not batch:
        return results
    # Regions with few terms are not padded to the many-term ones: one run per size.
    solved: dict[int, np.ndarray] = {}
    for bucket in _buckets([b[2].alpha.shape[0] for b in batch]):
        group = [batch[j] for j in bucket]
        with np.errstate(all="ignore"):  # a degenerate step is caught below, not warned about
            ts = _PrimalDual(
                [b[2] for b in group], [results[b[0]][b[3]] for b in group], [b[4] for b in group]
            ).run(tolerance, max_steps)
        solved.update(zip(bucket, ts, strict=True))
    for j, (i, _terms, sub, idx, f0) in enumerate(batch):
        t = solved[j]
        t0 = results[i]
        candidate = t0.copy()
        candidate[idx] = t - (np.mean(t) - np.mean(t0[idx]))  # the same gauge as the start
        # (the channels outside idx touch no term: the objective over idx is the region's)
        if np.all(np.isfinite(candidate)) and objective(sub, candidate[idx]) <= f0:
            results[i] = candidate
    return results


def _solve_each(matrices: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``matrices[r] x = rhs[r]`` for every region; returns ``x`` as ``(K, R)`` and
    which regions' systems could not be solved (their ``x`` is 0)."""
    try:
        return np.linalg.solve(matrices, rhs[:, :, None])[:, :, 0].T, np.zeros(len(rhs), bool)
    except np.linalg.LinAlgError:
        pass
    out, failed = np.zeros_like(rhs), np.zeros(len(rhs), bool)
    for r, (m, b) in enumerate(zip(matrices, rhs, strict=True)):
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(b))):
            failed[r] = True
            continue
        try:
            out[r] = np.linalg.solve(m, b)
        except np.linalg.LinAlgError:
            try:
                out[r] = np.linalg.lstsq(m, b, rcond=None)[0]
            except np.linalg.LinAlgError:
                failed[r] = True
    return out.T, failed


# OpenBLAS factors a system of this many rows or more on several threads; on a loaded
# machine that costs 10-20x the time of one thread (a 144-row system: 0.7 to 13.5 ms,
# 99 rows 0.08 ms). Larger systems are solved by blocks below this size.
_THREADED_ROWS = 100


def _solve_blocks(m: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``m x = y`` (``y``: (n, r)) by block elimination over halves of ``m`` until
    they are under :data:`_THREADED_ROWS` rows. No pivoting across the blocks: for a
    positive definite ``m`` (a Newton system's Schur complement), whose leading blocks
    are too."""
    n = m.shape[0]
    if n < _THREADED_ROWS:
        return np.linalg.solve(m, y)
    h = n // 2
    a, b, c, d = m[:h, :h], m[:h, h:], m[h:, :h], m[h:, h:]
    x = _solve_blocks(a, np.concatenate([b, y[:h]], axis=1))  # A^-1 [B, y1]
    x_b, x_y = x[:, : n - h], x[:, n - h :]
    z = _solve_blocks(d - c @ x_b, y[h:] - c @ x_y)
    return np.concatenate([x_y - x_b @ z, z])


def _buckets(terms_per_region: list[int]) -> list[list[int]]:
    """Indices grouped by term count: up to 3, 4 to 6, more."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(terms_per_region):
        groups.setdefault(0 if k <= 3 else 1 if k <= 6 else 2, []).append(i)
    return [groups[g] for g in sorted(groups)]


class _PrimalDual:
    """A primal-dual interior-point method (Mehrotra's predictor-corrector) for the
    epigraph form of several regions at once: minimize ``sum_kj exp(logwc_kj + 2 mu_k -
    2 sigma_k t_j)`` subject to ``alpha_kj + sigma_k t_j <= mu_k`` (where supported) and
    a box on ``t``. Channels of all regions sit side by side (``N`` columns, region ``r``
    in a contiguous block); term ``k`` of every region is row ``k`` (``K`` rows, the
    most terms a region has; missing ones are empty)."""

    def __init__(self, problems: list[Terms], starts: list[np.ndarray], scales: list[float]):
        kmax = max(p.alpha.shape[0] for p in problems)
        sizes = [p.alpha.shape[1] for p in problems]
        self.sizes = np.asarray(sizes)
        self.starts = np.cumsum([0] + sizes[:-1])
        self.region = np.repeat(np.arange(len(problems)), sizes)
        n = int(sum(sizes))
        self.alpha = np.full((kmax, n), -np.inf)
        self.logwc = np.full((kmax, n), -np.inf)
        sign = np.zeros((kmax, len(problems)))
        self.fixed = np.ones((kmax, len(problems)), bool)  # mu_0 and empty rows are held
        for r, (p, f0) in enumerate(zip(problems, scales, strict=True)):
            k = p.alpha.shape[0]
            cols = slice(self.starts[r], self.starts[r] + sizes[r])
            self.alpha[:k, cols] = p.alpha
            # log(w_k c_kj), scaled so that each region's objective is about 1 at the start
            self.logwc[:k, cols] = p.logw[:, None] + p.logc - math.log(f0)
            sign[:k, r] = p.sign
            self.fixed[1:k, r] = False  # the objective is flat along a common shift
        self.sup = np.isfinite(self.alpha)  # alpha stays -inf where unsupported: slack inf
        self.sk = self.expand(sign)
        # d2/(dmu dt) is -sign * (4e + d) for the free term variables, 0 for held ones
        self.h_sign = np.where(self.expand(self.fixed), 0.0, -self.sk)
        t0 = np.concatenate(starts)
        self.lo_box, self.hi_box = t0 - _T_BOUND, t0 + _T_BOUND
        self.m = self.per_region(self.sup.astype(float)).sum(axis=0) + 2.0 * np.asarray(sizes)
        self.t = t0
        self.mu, self.e, self.s, self.sl, self.sh, self.lam, self.lam_l, self.lam_h = (
            self.centered()
        )
        self.restarts = np.zeros(len(problems), int)

    def centered(self):
        """Term variables, state and multipliers that start the method at the current
        ``t``: each term variable a little above its max, each multiplier times its
        slack the same per region (the central path's condition)."""
        # -inf where unsupported
        mu = np.maximum.reduceat(self.alpha + self.sk * self.t, self.starts, axis=1)
        mu = np.where(np.isfinite(mu), mu, 0.0) + 0.1
        e, s, sl, sh = self.state(self.t, mu)
        nu = np.maximum(self.per_region(e).sum(axis=0), 1e-3) / self.m
        nu_c = self.expand(nu)
        return mu, e, s, sl, sh, np.where(self.sup, nu_c / s, 0.0), nu_c / sl, nu_c / sh

    def restart(self, which: np.ndarray) -> None:
        """Start regions ``which`` afresh from their current ``t`` (see :data:`_RESTARTS`)."""
        fresh = self.centered()
        cols = self.expand(which)
        self.mu = np.where(which, fresh[0], self.mu)
        for name, value in zip(("e", "s", "lam"), (fresh[1], fresh[2], fresh[5]), strict=True):
            setattr(self, name, np.where(cols, value, getattr(self, name)))
        for name, value in zip(
            ("sl", "sh", "lam_l", "lam_h"), (fresh[3], fresh[4], fresh[6], fresh[7]), strict=True
        ):
            setattr(self, name, np.where(cols, value, getattr(self, name)))
        self.restarts = self.restarts + which

    def per_region(self, x: np.ndarray) -> np.ndarray:
        """Sums over each region's channels: (..., N) -> (..., R)."""
        return np.add.reduceat(x, self.starts, axis=-1)

    def expand(self, x: np.ndarray) -> np.ndarray:
        """Per region -> per channel along the last axis: (..., R) -> (..., N) (the same
        as indexing with ``self.region``, a few times faster)."""
        return np.repeat(x, self.sizes, axis=-1)

    def state(self, t, mu):
        """Exponentials and slacks at ``(t, mu)``."""
        # (K, N) arrays are updated in place where an expression would allocate a
        # temporary: the same operations in the same order, so the same values.
        u = self.expand(mu)
        u -= self.sk * t
        e = np.multiply(u, 2.0)
        e += self.logwc
        np.minimum(e, _MAX_EXP, out=e)
        np.exp(e, out=e)
        # slacks stay positive in exact arithmetic; rounding must not make them 0 (and
        # they are inf where unsupported: alpha is -inf there)
        u -= self.alpha
        s = np.maximum(u, _TINY, out=u)
        return e, s, np.maximum(t - self.lo_box, _TINY), np.maximum(self.hi_box - t, _TINY)

    def gaps(self, lam, s, lam_l, sl, lam_h, sh) -> tuple[np.ndarray, np.ndarray]:
        """Each region's duality gap (the sum of its products of slack and multiplier),
        and their sums per channel."""
        comp = np.where(self.sup, s, 0.0)
        comp *= lam
        comp = comp.sum(axis=0) + lam_l * sl + lam_h * sh
        return np.add.reduceat(comp, self.starts), comp

    def run(self, tolerance: float, max_steps: int = 80) -> list[np.ndarray]:
        count = len(self.sizes)
        results: list[np.ndarray | None] = [None] * count
        ids = np.arange(count)  # the original index of each region still stepping
        done = np.zeros(count, bool)
        best_f = np.full(count, np.inf)
        best_t = self.t.copy()
        per_term = self.per_region(self.e)  # then the line search's, at the step it took
        for _ in range(max_steps):
            sup, sk = self.sup, self.sk
            e, s, sl, sh = self.e, self.s, self.sl, self.sh
            f = per_term.sum(axis=0)
            gap, comp = self.gaps(self.lam, s, self.lam_l, sl, self.lam_h, sh)
            self.grad_t = -2.0 * (sk * e).sum(axis=0)
            self.grad_mu = 2.0 * per_term
            better = np.isfinite(f) & (f < best_f)
            if np.any(better):  # every iterate is feasible: keep each region's best
                best_f = np.where(better, f, best_f)
                mask = self.expand(better)
                best_t = np.where(mask, self.t, best_t)
            converged = gap <= tolerance * f
            if np.any(converged):  # (the dual residual is a pass over every channel)
                converged &= self.stationary(f, tolerance)
            done |= ~np.isfinite(f) | converged
            if np.all(done):
                break
            finished = self.sizes[done].sum()
            if finished >= _DROP_SHARE * self.t.shape[0]:
                # Regions that are done no longer move: their result is final, and
                # dropping them spares every later step their channels (regions of a
                # batch converge in 5 to 15 steps).
                self._finish(done, f, best_f, best_t, ids, results)
                keep = ~done
                cols = keep[self.region]
                best_t, best_f, ids, done = best_t[cols], best_f[keep], ids[keep], done[keep]
                self._keep(keep, cols)
                sup, sk = self.sup, self.sk
                e, s, sl, sh = self.e, self.s, self.sl, self.sh
                f, gap, comp = f[keep], gap[keep], comp[cols]
            self.factor()
            pred = self.direction()
            # The products of the affine step's changes: the corrector's second-order
            # terms, and the gap after the affine step. Along it each pair of slack and
            # multiplier goes to (lam + a dlam)(s + a ds) = (1 - a) lam s + a^2 dlam ds
            # (its Newton equation is lam ds + s dlam = -lam s): no pass over the
            # (K, N) arrays beyond this product.
            corr = np.where(sup, pred.ds * pred.dlam, 0.0)
            corr_l, corr_h = pred.d_t * pred.dlam_l, -pred.d_t * pred.dlam_h
            a_c = self.expand(pred.a)
            gap_aff = self.per_region(
                (1.0 - a_c) * comp + a_c**2 * (corr.sum(axis=0) + corr_l + corr_h)
            )
            sigma = np.minimum(1.0, (gap_aff / gap) ** 3)
            target = self.expand(sigma * gap / self.m)
            d_t, d_mu, ds, dlam, dlam_l, dlam_h, a = self.direction(target, corr, corr_l, corr_h)
            # A region whose direction is not finite (its slacks reached 0 and d = lam / s
            # overflowed) takes no step: 0 * NaN would still reach its iterate. It stalls,
            # and is restarted below. (Sums propagate NaN and Inf: one pass per array.)
            finite = np.isfinite(
                self.per_region(d_t + dlam.sum(axis=0) + dlam_l + dlam_h) + d_mu.sum(axis=0)
            )
            if not np.all(finite):
                cols = self.expand(finite)
                a = np.where(finite, a, 0.0)
                d_t, dlam_l, dlam_h = (np.where(cols, x, 0.0) for x in (d_t, dlam_l, dlam_h))
                d_mu = np.where(finite, d_mu, 0.0)
                dlam = np.where(cols, dlam, 0.0)
            a = np.where(done, 0.0, _STEP_FRACTION * a)
            # The objective is not quadratic: shorten a step whose linearization is poor
            # (the objective may rise a little on the way, not by much).
            rise = _RISE_FACTOR * f + _RISE_GAPS * gap
            for _ in range(_MAX_HALVINGS):
                new = self.state(self.t + self.expand(a) * d_t, self.mu + a * d_mu)
                per_term = self.per_region(new[0])
                bad = per_term.sum(axis=0) > rise
                bad &= a > 0
                if not np.any(bad):
                    break
                a = np.where(bad, 0.5 * a, a)
            else:
                a = np.where(bad, 0.0, a)
                new = self.state(self.t + self.expand(a) * d_t, self.mu + a * d_mu)
                per_term = self.per_region(new[0])
            stalled = (a <= 1e-12) & ~done
            again = stalled & (self.restarts < _RESTARTS)
            done |= stalled & ~again
            a_c = self.expand(a)
            self.t, self.mu = self.t + a_c * d_t, self.mu + a * d_mu
            self.e, self.s, self.sl, self.sh = new
            dlam *= a_c
            dlam += self.lam
            self.lam = np.where(sup, np.maximum(dlam, _TINY, out=dlam), 0.0)
            self.lam_l = np.maximum(self.lam_l + a_c * dlam_l, _TINY)
            self.lam_h = np.maximum(self.lam_h + a_c * dlam_h, _TINY)
            if np.any(again):
                self.restart(again)
                per_term = self.per_region(self.e)
        f = self.per_region(self.e).sum(axis=0)  # self.e is the state at (t, mu)
        self._finish(np.ones(len(ids), bool), f, best_f, best_t, ids, results)
        return results

    def _finish(self, which, f, best_f, best_t, ids, results) -> None:
        """Each region of ``which``'s result: its last iterate, or its best one if that
        was better (``f``: the objective at the last)."""
        last = np.isfinite(f) & (f <= best_f)
        t = np.where(self.expand(last), self.t, best_t)
        for r in np.flatnonzero(which):
            a = self.starts[r]
            results[ids[r]] = t[a : a + self.sizes[r]]

    def _keep(self, keep: np.ndarray, cols: np.ndarray) -> None:
        """Go on with the regions ``keep`` only (``cols``: their channels)."""
        for name in ("alpha", "logwc", "sup", "sk", "h_sign", "e", "s", "lam"):  # (K, N)
            setattr(self, name, getattr(self, name)[:, cols])
        for name in ("lo_box", "hi_box", "t", "sl", "sh", "lam_l", "lam_h", "grad_t"):
            setattr(self, name, getattr(self, name)[cols])
        for name in ("mu", "fixed", "grad_mu"):  # (K, R)
            setattr(self, name, getattr(self, name)[:, keep])
        self.m, self.sizes, self.restarts = self.m[keep], self.sizes[keep], self.restarts[keep]
        self.starts = np.cumsum(np.concatenate([[0], self.sizes[:-1]]))
        self.region = np.repeat(np.arange(len(self.sizes)), self.sizes)

    def stationary(self, f: np.ndarray, tolerance: float) -> np.ndarray:
        """Whether each region's dual residual is below ``tolerance`` times its objective."""
        r_t = self.grad_t + (self.sk * self.lam).sum(axis=0) - self.lam_l + self.lam_h
        r_mu = np.where(self.fixed, 0.0, self.grad_mu - self.per_region(self.lam))
        res = self.per_region(np.abs(r_t)) + np.abs(r_mu).sum(axis=0)
        return res <= tolerance * f

    def factor(self, to_channels: bool = True) -> None:
        """Per region, the Newton matrix reduced to the term variables (a Schur
        complement over the diagonal channel block), or to the channels (over the
        diagonal block of the term variables) for a region with more terms than
        channels: the smaller system of the two (both unless ``to_channels`` is False,
        for tests: they give the same step up to rounding)."""
        self.d = self.lam / self.s  # 0 where unsupported (s = inf)
        w = np.multiply(self.e, 4.0)
        w += self.d
        self.d_l, self.d_h = self.lam_l / self.sl, self.lam_h / self.sh
        self.h_tt = w.sum(axis=0) + self.d_l + self.d_h
        self.h_tm = self.h_sign * w  # d2/(dmu dt)
        self.scaled = self.h_tm / self.h_tt
        k = w.shape[0]
        self.diag_mu = diag = np.where(self.fixed, 1.0, self.per_region(w))  # (K, R)
        self.by_channel = np.zeros(len(self.sizes), bool)
        if k <= 6:  # many small regions: one broadcast product for all
            # The rows of term variables held in every region (mu_0 at least) are set
            # below whatever the product says: it is taken over the others only.
            free = np.flatnonzero(~np.all(self.fixed, axis=1))
            scaled, h_tm = self.scaled[free], self.h_tm[free]
            outer = np.zeros((len(self.sizes), k, k))
            outer[:, free[:, None], free[None, :]] = self.per_region(
                scaled[:, None, :] * h_tm[None, :, :]
            ).transpose(2, 0, 1)  # (R, K, K)
        else:  # a region of many terms (a long residual stream): a (K, K, N) array is too big
            # A region with more free term variables than channels (a residual stream
            # of many blocks) is reduced to its channels instead: its system's size no
            # longer grows with the depth. Its row of `outer` is left 0 (not solved).
            self.by_channel = ((~self.fixed).sum(axis=0) > self.sizes) & to_channels
            outer = np.zeros((len(self.sizes), k, k))
            self.channel_systems = {}
            for r, (a, n) in enumerate(zip(self.starts, self.sizes, strict=True)):
                h_tm = self.h_tm[:, a : a + n]
                if not self.by_channel[r]:
                    outer[r] = self.scaled[:, a : a + n] @ h_tm.T
                    continue
                # (held rows: h_tm 0, diag 1, so they drop out)
                over = h_tm / diag[:, r : r + 1]  # B / D_mu
                m = -(over.T @ h_tm)
                m[np.arange(n), np.arange(n)] += self.h_tt[a : a + n]
                self.channel_systems[r] = (m, over)
        schur = -outer
        schur[:, np.arange(k), np.arange(k)] += diag.T
        fixed = self.fixed.T  # (R, K)
        schur = np.where(fixed[:, :, None] | fixed[:, None, :], 0.0, schur)
        schur[:, np.arange(k), np.arange(k)] += np.where(fixed, 1.0, 0.0)
        self.schur = schur

    def solve(self, rhs_t: np.ndarray, rhs_mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Newton system's term part ``d_mu`` (K, R) for the right-hand sides
        ``rhs_t`` (N,) and ``rhs_mu`` (K, R), and which regions' systems failed."""
        rhs = rhs_mu - self.per_region(self.scaled * rhs_t)  # (K, R)
        if not np.any(self.by_channel):
            return _solve_each(self.schur, rhs.T)
        by_term = ~self.by_channel
        d_mu, failed = np.zeros_like(rhs), np.zeros(len(self.sizes), bool)
        d_mu[:, by_term], failed[by_term] = _solve_each(self.schur[by_term], rhs.T[by_term])
        for r, (m, over) in self.channel_systems.items():
            # d_t from (H_tt - B' D_mu^-1 B) d_t = rhs_t - B' D_mu^-1 rhs_mu, then
            # d_mu = D_mu^-1 (rhs_mu - B d_t)
            cols = slice(self.starts[r], self.starts[r] + self.sizes[r])
            y = rhs_t[cols] - over.T @ rhs_mu[:, r]
            try:
                d_t = _solve_blocks(m, y[:, None])[:, 0]
            except np.linalg.LinAlgError:
                d_t, failed[r] = np.zeros_like(y), True
            d_mu[:, r] = (rhs_mu[:, r] - self.h_tm[:, cols] @ d_t) / self.diag_mu[:, r]
        return d_mu, failed

    def direction(self, target=None, corr=None, corr_l=None, corr_h=None) -> _Step:
        """Newton step towards ``lam * slack = target`` (less a second-order correction;
        no target: the affine step, towards 0) and, per region, the longest step that
        keeps slacks and multipliers positive."""
        sk, s, sl, sh = self.sk, self.s, self.sl, self.sh
        # Unsupported entries have s = inf, lam = d = corr = 0: they come out 0 (their
        # ratios inf) without masking.
        if target is None:
            c, c_l, c_h = 0.0, 0.0, 0.0
            rhs_t = -self.grad_t
            rhs_mu = np.where(self.fixed, 0.0, -self.grad_mu)
        else:
            c = (target - corr) / s
            c_l, c_h = (target - corr_l) / sl, (target - corr_h) / sh
            rhs_t = -(self.grad_t + (sk * c).sum(axis=0) - c_l + c_h)
            rhs_mu = np.where(self.fixed, 0.0, self.per_region(c) - self.grad_mu)
        d_mu, failed = self.solve(rhs_t, rhs_mu)
        d_mu_c = self.expand(d_mu)
        scratch = self.h_tm * d_mu_c
        d_t = (rhs_t - scratch.sum(axis=0)) / self.h_tt
        ds = d_mu_c
        ds -= np.multiply(sk, d_t, out=scratch)
        dlam = c - self.lam
        dlam -= np.multiply(self.d, ds, out=scratch)
        dlam_l = c_l - self.lam_l - self.d_l * d_t
        dlam_h = c_h - self.lam_h + self.d_h * d_t
        # Per channel, the most negative relative change dx / x of a slack or multiplier
        # (NaN where both are 0, unsupported: fmin skips it); the step is -1 / that.
        per_channel = np.fmin.reduce(
            [
                np.fmin.reduce(np.divide(ds, s, out=scratch), axis=0),
                d_t / sl,
                -d_t / sh,
                np.fmin.reduce(np.divide(dlam, self.lam, out=scratch), axis=0),
                dlam_l / self.lam_l,
                dlam_h / self.lam_h,
            ]
        )
        q = np.fmin.reduceat(per_channel, self.starts)
        a = np.where(q < -1.0, -1.0 / q, 1.0)
        a = np.where(failed, 0.0, a)  # a degenerate region stops where it is
        return _Step(d_t, d_mu, ds, dlam, dlam_l, dlam_h, a)
