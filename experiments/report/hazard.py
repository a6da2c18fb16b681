"""Escape as an event in time: discrete-time hazard ratios, McNemar, Kaplan–Meier bands.

Seeds are evaluated every E steps, so an escape (the first evaluation at or above the
threshold) is only known to have happened within an interval ((j − 1)E, jE]. The
natural model is the discrete-time hazard: for every seed and every interval it is at
risk in (not escaped before, still observed), a Bernoulli "escapes in this interval",

    logit P(escape in j | at risk) = α_stratum [+ γ_j] + β · [read is the treatment],

fitted by maximum likelihood (statsmodels' binomial GLM) on the person-period rows. e^β
is the hazard odds ratio: for the small per-interval hazards of a plateau it is the
ratio of escape hazards, the replication's "about 6x". Strata are the comparison groups
pooled (their baseline hazards differ: other regimes, batch sizes, budgets); the
baseline hazard is constant in time within a stratum by default (``baseline="constant"``:
with a few escapes per arm, a per-interval baseline is not identifiable) or one term
per interval (``baseline="interval"``). A stratum with no escape at all says nothing
about β and is left out; with no escape in one arm the ratio is unbounded and is
reported as None with the reason, never as a number.

McNemar's exact test compares the solved / unsolved outcomes of two reads on the same
seeds (paired: same initialization and data). Kaplan–Meier estimates (scipy) carry
pointwise 95% log-log confidence bands.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from experiments.report.statistics import escape_events, finite_or_none

BASELINES = ("constant", "interval")


def person_periods(summary: Mapping, interval: int) -> tuple[np.ndarray, np.ndarray]:
    """The at-risk rows of one read: (interval index per row, escaped in it per row).

    A seed that escapes at step s is at risk in intervals 1..ceil(s / interval) and
    escapes in the last; a seed censored at step c is at risk in 1..floor(c / interval).

    Args:
        summary: a read's summary (``statistics.summarize_read``).
        interval: steps between evaluations (> 0).
    """
    if not isinstance(interval, (int, np.integer)) or interval <= 0:
        raise ValueError(f"interval must be a positive number of steps, got {interval!r}.")
    escaped, censored = escape_events(summary)
    index, event = [], []
    for step in escaped:
        last = math.ceil(step / interval)
        index += range(1, last + 1)
        event += [0] * (last - 1) + [1]
    for step in censored:
        last = step // interval
        index += range(1, last + 1)
        event += [0] * last
    return np.asarray(index, np.int64), np.asarray(event, np.int64)


def hazard_ratio(
    groups: Sequence[tuple[Mapping, Mapping, int]], baseline: str = "constant"
) -> dict:
    """The hazard odds ratio of a treatment read over a baseline read, stratified.

    Args:
        groups: one (baseline summary, treatment summary, evaluation interval) per
            comparison group (stratum).
        baseline: ``"constant"`` or ``"interval"`` (see the module docstring).

    Returns:
        dict with ``ratio``, ``ci`` ([low, high], 95% Wald), ``p`` (Wald), ``log_ratio``,
        ``se``, ``events`` ([baseline, treatment]), ``person_periods`` ([baseline,
        treatment]), ``strata_used``, ``baseline_model``; ``ratio`` None with ``reason``
        when the data cannot give one.
    """
    # Not statsmodels.api, which imports every model; statsmodels 0.14 under pandas 3
    # warns of pandas' deprecations at import, nothing the user can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from statsmodels.genmod import families
        from statsmodels.genmod.generalized_linear_model import GLM

    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}; use one of {BASELINES}.")
    rows = []  # (stratum, interval, treated, event)
    events = [0, 0]
    periods = [0, 0]
    used = 0
    for stratum, (base, treat, interval) in enumerate(groups):
        parts = [person_periods(s, interval) for s in (base, treat)]
        if sum(int(e.sum()) for _, e in parts) == 0:
            continue  # No escape in this stratum: no information on the ratio.
        used += 1
        for treated, (index, event) in enumerate(parts):
            events[treated] += int(event.sum())
            periods[treated] += len(index)
            rows += [(stratum, j, treated, e) for j, e in zip(index, event, strict=True)]
    result = {
        "ratio": None,
        "ci": [None, None],
        "p": None,
        "log_ratio": None,
        "se": None,
        "events": events,
        "person_periods": periods,
        "strata_used": used,
        "baseline_model": baseline,
        "reason": None,
    }
    if min(events) == 0:
        if events[0] == 0:
            result["reason"] = "no escape under the baseline: the ratio is unbounded"
        else:
            result["reason"] = "no escape under the treatment: the ratio's estimate is 0"
        return result
    data = np.asarray(rows, np.int64)
    strata = sorted(set(data[:, 0]))
    columns = [(data[:, 0] == s).astype(float) for s in strata]
    if baseline == "interval":
        intervals = sorted(set(data[:, 1]))
        columns += [(data[:, 1] == j).astype(float) for j in intervals[1:]]
    columns.append(data[:, 2].astype(float))
    design = np.column_stack(columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # perfect-separation and convergence chatter
        try:
            fit = GLM(data[:, 3], design, family=families.Binomial()).fit()
        except (np.linalg.LinAlgError, ValueError) as e:
            result["reason"] = f"the fit failed: {e}"
            return result
    beta, se = float(fit.params[-1]), float(fit.bse[-1])
    if not (math.isfinite(beta) and math.isfinite(se)) or se > 50:
        result["reason"] = "the fit did not converge (separation)"
        return result
    result.update(
        ratio=math.exp(beta),
        ci=[math.exp(beta - 1.959964 * se), math.exp(beta + 1.959964 * se)],
        p=finite_or_none(float(fit.pvalues[-1])),
        log_ratio=beta,
        se=se,
    )
    return result


def mcnemar_paired(baseline: Mapping, treatment: Mapping) -> dict:
    """McNemar's exact test of solved outcomes on the seeds both reads ran.

    Returns:
        dict with ``table`` ([[both, baseline only], [treatment only, neither]]),
        ``num_pairs`` and ``p`` (two-sided exact; None without pairs).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in hazard_ratio
        from statsmodels.stats.contingency_tables import mcnemar

    base = dict(zip(baseline["seeds"], baseline["is_solved"], strict=True))
    treat = dict(zip(treatment["seeds"], treatment["is_solved"], strict=True))
    seeds = sorted(set(base) & set(treat))
    both = sum(base[s] and treat[s] for s in seeds)
    base_only = sum(base[s] and not treat[s] for s in seeds)
    treat_only = sum(treat[s] and not base[s] for s in seeds)
    neither = len(seeds) - both - base_only - treat_only
    table = [[both, base_only], [treat_only, neither]]
    p = float(mcnemar(table, exact=True).pvalue) if seeds else None
    return {"table": table, "num_pairs": len(seeds), "p": p}


def kaplan_meier(summary: Mapping, end: int) -> dict:
    """Kaplan–Meier estimate of the fraction solved vs step with pointwise 95% log-log
    bands (scipy), as step-function points from 0 to ``end``.

    Returns:
        dict with ``steps``, ``solved``, ``low``, ``high`` (lists of equal length, the
        value holding from each step to the next).
    """
    from scipy import stats

    escaped, censored = escape_events(summary)
    steps, solved, low, high = [0], [0.0], [0.0], [0.0]
    if escaped:
        cdf = stats.ecdf(stats.CensoredData(uncensored=escaped, right=censored)).cdf
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            band = cdf.confidence_interval(0.95, method="log-log")
        steps += [int(s) for s in cdf.quantiles]
        solved += [float(p) for p in cdf.probabilities]
        # The band is undefined (NaN) where the estimate is 0 or 1: it is then the point.
        bounds = [bound.evaluate(cdf.quantiles) for bound in (band.low, band.high)]
        for out, values in zip((low, high), bounds, strict=True):
            out += [
                float(p if math.isnan(b) else b)
                for p, b in zip(cdf.probabilities, values, strict=True)
            ]
    if steps[-1] < end:
        steps.append(int(end))
        solved.append(solved[-1])
        low.append(low[-1])
        high.append(high[-1])
    return {"steps": steps, "solved": solved, "low": low, "high": high}
