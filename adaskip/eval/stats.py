"""Confidence intervals and paired tests for quality comparisons (scipy.stats does the statistics).

* An exact-match rate: the exact binomial (Clopper-Pearson) interval of k successes in n questions.
* A mean over units (ROUGE-L per summary, mean next-token KL per document): a bootstrap interval (BCa, fixed seed)
  that resamples the units, never the tokens inside one document (they are not independent).
* A method against another on the same units (a paired design):
  - exact match: McNemar's exact test (a binomial test on the discordant pairs) and the exact interval of the
    difference in rates conditional on the discordant pairs (the test's dual: the interval excludes 0 exactly when
    p < 1 - level); a tie also needs a bound that covers the uncertainty of the discordant rate (compare_binary);
  - continuous metrics: a paired bootstrap interval of the mean difference, and the sign test's p-value.
* The verdict reads the interval of the difference, oriented so that positive is better for us: `beats` (it lies
  above 0), `loses` (below 0), `ties` (inside +-margin: any difference is too small to matter), else `inconclusive`
  (the data allow neither). Too few pairs for a bootstrap give no verdict (`n/a`).

Questions that share a document are treated as independent units; each retrieval document carries 1-4 questions,
so the binomial intervals are somewhat narrower than a document-level (cluster) interval would be.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
SEED = 0
RESAMPLES = 4999
MIN_BOOTSTRAP = 8  # fewer units than this: no bootstrap interval, no verdict
VERDICTS = ("beats", "ties", "loses", "inconclusive", "n/a")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _nan_interval(n: int, method: str, estimate: float = math.nan) -> Interval:
    return Interval(estimate, math.nan, math.nan, n, method)


def proportion_ci(successes: int, n: int, level: float = LEVEL) -> Interval:
    """The exact (Clopper-Pearson) interval of a rate of `successes` in `n` trials."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n; got {successes} of {n}")
    if n == 0:
        return _nan_interval(0, "clopper-pearson")
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return Interval(successes / n, float(ci.low), float(ci.high), n, "clopper-pearson")


def _bootstrap_mean(values: np.ndarray, level: float, seed: int, resamples: int) -> tuple[float, float]:
    if np.ptp(values) == 0:  # every unit the same: the resampled means are too (BCa is undefined there)
        return float(values[0]), float(values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns on near-degenerate samples; we fall back below
        res = sps.bootstrap((values,), np.mean, confidence_level=level, n_resamples=resamples, method="BCa",
                            rng=np.random.default_rng(seed), vectorized=True)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(low) and math.isfinite(high)):
            res = sps.bootstrap((values,), np.mean, confidence_level=level, n_resamples=resamples,
                                method="percentile", rng=np.random.default_rng(seed), vectorized=True)
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return low, high


def mean_ci(values: Sequence[float], level: float = LEVEL, seed: int = SEED, resamples: int = RESAMPLES) -> Interval:
    """The mean of `values` (one per unit) with its bootstrap (BCa) interval; no interval under MIN_BOOTSTRAP units."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return _nan_interval(0, "bootstrap-bca")
    if x.size < MIN_BOOTSTRAP:
        return _nan_interval(int(x.size), "bootstrap-bca", float(x.mean()))
    low, high = _bootstrap_mean(x, level, seed, resamples)
    return Interval(float(x.mean()), low, high, int(x.size), "bootstrap-bca")


@dataclass(frozen=True)
class Comparison:
    """Ours against theirs on the same units. `difference` is ours - theirs (raw orientation); the verdict reads
    it with `higher_better`."""

    n: int
    ours: float
    theirs: float
    difference: Interval
    p_value: float
    test: str
    verdict: str
    discordant: tuple[int, int] | None = None  # exact match: (ours right only, theirs right only)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["difference"] = self.difference.to_dict()
        return d


def verdict(difference: Interval, higher_better: bool, margin: float,
            tie_bounds: tuple[float, float] | None = None) -> str:
    """beats / loses when the interval of ours - theirs excludes 0 on the better / worse side; ties when it (or
    `tie_bounds`, a more conservative interval for the equivalence claim) lies within +-margin; inconclusive
    otherwise; n/a without an interval."""
    low, high = difference.low, difference.high
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if not higher_better:
        low, high = -high, -low
    if low > 0:
        return "beats"
    if high < 0:
        return "loses"
    tl, th = tie_bounds if tie_bounds is not None else (low, high)
    if -margin <= tl and th <= margin:
        return "ties"
    return "inconclusive"


def _paired(ours: Sequence[float], theirs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two equal-length lists; got {a.shape} and {b.shape}")
    return a, b


def compare_binary(ours: Sequence[float], theirs: Sequence[float], margin: float = 0.05,
                   level: float = LEVEL) -> Comparison:
    """Exact-match scores (0/1) of two methods on the same questions: McNemar's exact test and the exact interval of
    the difference in rates, conditional on the discordant pairs (d = m/n * (2 pi - 1), pi's Clopper-Pearson
    interval, pi = share of the m discordant pairs that we answer right).

    The conditional interval ignores how uncertain the discordant rate q = m/n itself is, which matters for a tie: 0
    discordant pairs out of 5 give [0, 0]. A tie is therefore claimed only when the conservative bound that also
    covers q (exact 1 - alpha/2 intervals for q and for pi, Bonferroni) lies within +-margin."""
    a, b = _paired(ours, theirs)
    if not np.isin(a, (0.0, 1.0)).all() or not np.isin(b, (0.0, 1.0)).all():
        raise ValueError("exact-match scores must be 0 or 1")
    n = int(a.size)
    if n == 0:
        return Comparison(0, math.nan, math.nan, _nan_interval(0, "mcnemar-exact"), math.nan, "mcnemar-exact", "n/a")
    win, loss = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    m = win + loss
    diff = (win - loss) / n
    half = 1 - (1 - level) / 2
    q_high = float(sps.binomtest(m, n).proportion_ci(confidence_level=half, method="exact").high)
    if m == 0:
        interval, p = Interval(0.0, 0.0, 0.0, n, "mcnemar-exact"), 1.0
        tie = (-q_high, q_high)  # pi unknown: d anywhere in [-q, q]
    else:
        test = sps.binomtest(win, m, 0.5)
        ci = test.proportion_ci(confidence_level=level, method="exact")
        interval = Interval(diff, m / n * (2 * float(ci.low) - 1), m / n * (2 * float(ci.high) - 1), n,
                            "mcnemar-exact")
        p = float(test.pvalue)
        wide = test.proportion_ci(confidence_level=half, method="exact")
        tie = (min(0.0, q_high * (2 * float(wide.low) - 1)), max(0.0, q_high * (2 * float(wide.high) - 1)))
    return Comparison(n, float(a.mean()), float(b.mean()), interval, p, "mcnemar-exact",
                      verdict(interval, True, margin, tie), (win, loss))


def compare_continuous(ours: Sequence[float], theirs: Sequence[float], higher_better: bool, margin: float,
                       level: float = LEVEL, seed: int = SEED, resamples: int = RESAMPLES) -> Comparison:
    """A continuous metric (one value per unit) of two methods on the same units: the paired bootstrap (BCa)
    interval of the mean difference ours - theirs, and the two-sided sign test's p-value (ties dropped)."""
    a, b = _paired(ours, theirs)
    n = int(a.size)
    d = a - b
    if n < MIN_BOOTSTRAP:
        interval = _nan_interval(n, "paired-bootstrap-bca", float(d.mean()) if n else math.nan)
    else:
        low, high = _bootstrap_mean(d, level, seed, resamples)
        interval = Interval(float(d.mean()), low, high, n, "paired-bootstrap-bca")
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    p = float(sps.binomtest(pos, pos + neg, 0.5).pvalue) if pos + neg else 1.0
    return Comparison(n, float(a.mean()) if n else math.nan, float(b.mean()) if n else math.nan, interval, p,
                      "sign-test", verdict(interval, higher_better, margin))
