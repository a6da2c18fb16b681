"""Escape as an event in time: discrete-time hazard ratios, McNemar, Kaplan–Meier bands.

Seeds are evaluated every E steps, so an escape (the first evaluation at or above the
threshold) is only known to have happened within an interval ((j − 1)E, jE]. The
natural model is the discrete-time hazard: for every seed and every interval it is at
risk in (not escaped before, still observed), a Bernoulli "escapes in this interval",

    logit P(escape in j | at risk, stratum s) = α_{s,j} + β · [read is the treatment],

fitted by maximum likelihood (statsmodels' binomial GLM) on the person-period rows. e^β
is the hazard odds ratio: for the small per-interval hazards of a plateau it is the
ratio of escape hazards, the replication's "about 6x". Strata are the comparison groups
pooled (their baselines differ: other regimes, batch sizes, budgets).

The baseline α (``baseline=``) is, by default, one term per stratum and interval
(``"stratum_interval"``: the discrete-time form of a stratified Cox model, each read
compared with the other at the same step of the same group). Escape hazards are far
from constant in time -- nothing escapes on the early plateau, most escapes come late in
the schedule -- and a read that escapes early leaves the risk set early, so a baseline
constant in time (``"constant"``: α_s) compares the treatment's early, low-hazard
intervals with the baseline's late ones and biases the ratio towards 1 (on the
replication's records, 3.0x instead of 5.8x pooled). ``"shared_interval"`` (α_s + γ_j:
one time shape for every stratum) lies between. Sparse data need no cruder model: an
(stratum, interval) cell without an escape, with only escapes, or with seeds of one read
only says nothing about β under its own α (its maximum-likelihood α is ±∞ or fits the
cell exactly whatever β), so it is left out, exactly; what remains is the cells where
both reads were at risk and something escaped. Where nothing does, or where one read
never escapes in them, the ratio is None with the reason, never a number.

McNemar's exact test compares the solved / unsolved outcomes of two reads on the same
seeds (paired: same initialization and data). Kaplan–Meier estimates (scipy) carry
pointwise 95% log-log confidence bands.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BASELINES = ("stratum_interval", "shared_interval", "constant")
DEFAULT_BASELINE = "stratum_interval"
BASELINE_DESCRIPTIONS = {
    "stratum_interval": "baseline hazard per evaluation interval and group",
    "shared_interval": "baseline hazard per evaluation interval, shared by the groups",
    "constant": "baseline hazard constant in time",
}
_Z95 = 1.959964


def finite_or_none(x: Any) -> float | None:
    """``float(x)``, or None when ``x`` is None, NaN or infinite."""
    return float(x) if x is not None and math.isfinite(x) else None


def escape_events(read_summary: Mapping) -> tuple[list[int], list[int]]:
    """``(escape steps of solved seeds, censoring steps of unsolved seeds)`` of one read
    (a summary of ``statistics.summarize_read``)."""
    escaped = [s for s in read_summary["escape_step"] if s is not None]
    censored = [c for c in read_summary["censor_step"] if c is not None]
    return escaped, censored


def person_periods(summary: Mapping, interval: int) -> tuple[np.ndarray, np.ndarray]:
    """The at-risk rows of one read: (interval index per row, escaped in it per row).

    A seed that escapes at step s is at risk in intervals 1..ceil(s / interval) and
    escapes in the last; a seed censored at step c is at risk in 1..floor(c / interval).

    Args:
        summary: a read's summary (``statistics.summarize_read``).
        interval: steps between evaluations (> 0).
    """
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval <= 0:
        raise ValueError(
            f"interval must be a positive number of steps between evaluations, got "
            f"{interval!r}; pass the run's eval_every."
        )
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


def _informative_cells(data: np.ndarray) -> np.ndarray:
    """Mask of the rows whose (stratum, interval) cell holds an escape, a seed that did
    not escape, and seeds of both reads: the only cells that inform β when each cell
    has its own baseline term."""
    keep = np.zeros(len(data), bool)
    if not len(data):
        return keep
    cells = data[:, 0] * (int(data[:, 1].max()) + 1) + data[:, 1]
    for cell in np.unique(cells):
        rows = cells == cell
        events, treated = data[rows, 3], data[rows, 2]
        keep[rows] = 0 < events.sum() < rows.sum() and 0 < treated.sum() < rows.sum()
    return keep


def _design(data: np.ndarray, baseline: str) -> np.ndarray:
    """Baseline columns (see the module docstring) and the treatment indicator last."""
    if baseline == "stratum_interval":
        keys = data[:, 0] * (int(data[:, 1].max()) + 1) + data[:, 1]
        columns = [(keys == k).astype(float) for k in np.unique(keys)]
    else:
        columns = [(data[:, 0] == s).astype(float) for s in np.unique(data[:, 0])]
        if baseline == "shared_interval":
            columns += [(data[:, 1] == j).astype(float) for j in np.unique(data[:, 1])[1:]]
    columns.append(data[:, 2].astype(float))
    return np.column_stack(columns)


def _unbounded_reason(data: np.ndarray) -> str | None:
    """Why the data give no finite, nonzero ratio (one read's outcomes all alike), or None."""
    for treated, name in ((0, "the baseline"), (1, "the treatment")):
        events = data[data[:, 2] == treated, 3]
        if events.sum() == 0:
            return f"no escape under {name} where both reads were at risk: the ratio is " + (
                "unbounded" if treated == 0 else "estimated as 0"
            )
        if events.sum() == len(events):
            return f"every seed of {name} at risk escaped: the ratio is not estimable"
    return None


def hazard_ratio(
    groups: Sequence[tuple[Mapping, Mapping, int]], baseline: str = DEFAULT_BASELINE
) -> dict:
    """The hazard odds ratio of a treatment read over a baseline read, stratified.

    Args:
        groups: one (baseline summary, treatment summary, evaluation interval) per
            comparison group (stratum); summaries as ``statistics.summarize_read``.
        baseline: the baseline-hazard model, one of :data:`BASELINES` (see the module
            docstring).

    Returns:
        dict with ``ratio``, ``ci`` ([low, high], 95% Wald), ``p`` (Wald), ``log_ratio``,
        ``se``, ``events`` and ``person_periods`` ([baseline, treatment], all rows),
        ``informative_person_periods`` (the rows the fit used), ``strata_used``,
        ``baseline_model``; ``ratio`` None with ``reason`` when the data cannot give one.
    """
    glm, families = _import_glm()
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}; use one of {BASELINES}.")
    if not groups:
        raise ValueError("no comparison group given; pass (baseline, treatment, interval) tuples.")
    data, events, periods = _stratified_person_periods(groups)
    data = _rows_informing_the_ratio(data, baseline)
    result = {
        "ratio": None,
        "ci": [None, None],
        "p": None,
        "log_ratio": None,
        "se": None,
        "events": events,
        "person_periods": periods,
        "informative_person_periods": [int((data[:, 2] == t).sum()) for t in (0, 1)],
        "strata_used": len(np.unique(data[:, 0])),
        "baseline_model": baseline,
        "reason": None,
    }
    result["reason"] = _why_no_ratio(data, events)
    if result["reason"] is not None:
        return result
    fit = _fit_log_ratio(data, baseline, glm, families)
    if isinstance(fit, str):
        result["reason"] = fit
        return result
    result.update(fit)
    return result


def _import_glm():
    """statsmodels' GLM class and its families module.

    Not statsmodels.api, which imports every model; statsmodels 0.14 under pandas 3
    warns of pandas' deprecations at import, nothing the user can act on.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from statsmodels.genmod import families
        from statsmodels.genmod.generalized_linear_model import GLM
    return GLM, families


def _stratified_person_periods(
    groups: Sequence[tuple[Mapping, Mapping, int]],
) -> tuple[np.ndarray, list[int], list[int]]:
    """Every group's person-period rows, (stratum, interval, treated, event) each, with
    the escapes and the rows counted per read ([baseline, treatment])."""
    rows = []  # (stratum, interval, treated, event)
    events = [0, 0]
    periods = [0, 0]
    for stratum, group in enumerate(groups):
        if len(group) != 3:
            raise ValueError(
                f"group {stratum} is {group!r}; each group is a (baseline summary, treatment "
                "summary, evaluation interval) tuple."
            )
        base, treat, interval = group
        for treated, summary in enumerate((base, treat)):
            index, event = person_periods(summary, interval)
            events[treated] += int(event.sum())
            periods[treated] += len(index)
            rows += [(stratum, j, treated, e) for j, e in zip(index, event, strict=True)]
    return np.asarray(rows, np.int64).reshape(-1, 4), events, periods


def _rows_informing_the_ratio(data: np.ndarray, baseline: str) -> np.ndarray:
    """The rows that say something about β under ``baseline`` (module docstring)."""
    if baseline == "stratum_interval":
        return data[_informative_cells(data)]
    # A stratum without any escape says nothing about the ratio.
    escaping = {s for s in np.unique(data[:, 0]) if data[data[:, 0] == s, 3].any()}
    return data[np.isin(data[:, 0], sorted(escaping))]


def _why_no_ratio(data: np.ndarray, events: Sequence[int]) -> str | None:
    """Why the informative rows ``data`` (of ``events`` escapes in all, per read) give no
    ratio, or None when a fit can try."""
    if min(events) == 0:
        return (
            "no escape under the baseline: the ratio is unbounded"
            if events[0] == 0
            else "no escape under the treatment: the ratio is estimated as 0"
        )
    if len(data) == 0:
        return "no evaluation interval holds an escape with seeds of both reads at risk"
    return _unbounded_reason(data)


def _fit_log_ratio(data: np.ndarray, baseline: str, glm, families) -> dict | str:
    """The binomial GLM's treatment term: ``ratio``, ``ci``, ``p``, ``log_ratio`` and
    ``se``, or the reason it gives none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # perfect-separation and convergence chatter
        try:
            fit = glm(data[:, 3], _design(data, baseline), family=families.Binomial()).fit()
        except (np.linalg.LinAlgError, ValueError) as e:
            return f"the fit failed: {e}"
    beta, se = float(fit.params[-1]), float(fit.bse[-1])
    if not (math.isfinite(beta) and math.isfinite(se)) or se > 50:
        return "the fit did not converge (separation)"
    return {
        "ratio": math.exp(beta),
        "ci": [math.exp(beta - _Z95 * se), math.exp(beta + _Z95 * se)],
        "p": finite_or_none(float(fit.pvalues[-1])),
        "log_ratio": beta,
        "se": se,
    }


def _solved_by_seed(summary: Mapping, name: str) -> dict:
    try:
        seeds, solved = summary["seeds"], summary["is_solved"]
    except (KeyError, TypeError):
        raise ValueError(
            f"the {name} summary has no 'seeds' and 'is_solved'; pass a read's summary "
            "(statistics.summarize_read)."
        ) from None
    if len(seeds) != len(solved) or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"the {name} summary needs one 'is_solved' per seed and each seed once; got "
            f"{len(seeds)} seeds ({len(set(seeds))} distinct) and {len(solved)} outcomes."
        )
    return dict(zip(seeds, solved, strict=True))


def mcnemar_paired(baseline: Mapping, treatment: Mapping) -> dict:
    """McNemar's exact test of solved outcomes on the seeds both reads ran.

    Returns:
        dict with ``table`` ([[both, baseline only], [treatment only, neither]]),
        ``num_pairs`` and ``p`` (two-sided exact: the binomial test of the discordant
        pairs; None without pairs).
    """
    return mcnemar_pooled([(baseline, treatment)])


def mcnemar_pooled(pairs: Sequence[tuple[Mapping, Mapping]]) -> dict:
    """McNemar's exact test over several comparison groups: each seed is paired within
    its group, and the groups' tables add up (a pair is a pair wherever it ran).

    Args:
        pairs: one (baseline summary, treatment summary) per group.

    Returns:
        as :func:`mcnemar_paired`, over every group's pairs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in hazard_ratio
        from statsmodels.stats.contingency_tables import mcnemar

    if not pairs:
        raise ValueError("no comparison group given; pass (baseline, treatment) summaries.")
    table = np.zeros((2, 2), np.int64)
    for baseline, treatment in pairs:
        table += _paired_table(baseline, treatment)
    num_pairs = int(table.sum())
    p = float(mcnemar(table, exact=True).pvalue) if num_pairs else None
    return {"table": table.tolist(), "num_pairs": num_pairs, "p": p}


def _paired_table(baseline: Mapping, treatment: Mapping) -> list[list[int]]:
    """[[both, baseline only], [treatment only, neither]] over the seeds both ran."""
    base = _solved_by_seed(baseline, "baseline")
    treat = _solved_by_seed(treatment, "treatment")
    seeds = sorted(set(base) & set(treat))
    both = sum(bool(base[s] and treat[s]) for s in seeds)
    base_only = sum(bool(base[s] and not treat[s]) for s in seeds)
    treat_only = sum(bool(treat[s] and not base[s]) for s in seeds)
    neither = len(seeds) - both - base_only - treat_only
    return [[both, base_only], [treat_only, neither]]


def kaplan_meier(summary: Mapping, end: float) -> dict:
    """Kaplan–Meier estimate of the fraction of seeds escaped (solved) vs step, with
    pointwise 95% log-log bands (scipy; Greenwood's variance), as step-function points
    from 0 to ``end``. The fraction not yet escaped (the survival function) is
    ``1 - solved``, its band ``1 - high`` to ``1 - low``.

    Args:
        summary: a read's summary (``statistics.summarize_read``).
        end: the last step to draw to (the run's total steps, or past it for a plot).

    Returns:
        dict with ``steps``, ``solved``, ``low``, ``high``, ``at_risk`` (seeds not
        escaped and still observed just before the step) and ``escapes`` (seeds escaping
        at the step): lists of equal length, each value holding from its step to the next.
    """
    from scipy import stats

    if isinstance(end, bool) or not isinstance(end, (int, float, np.integer, np.floating)):
        raise ValueError(f"end must be a step number, got {end!r}; pass the run's total steps.")
    if not end >= 0:
        raise ValueError(f"end must be a step >= 0, got {end}; pass the run's total steps.")
    escaped, censored = escape_events(summary)
    times = np.asarray(escaped + censored, np.int64)

    def at_risk(step: int) -> int:
        return int((times >= step).sum())

    steps, solved, low, high = [0], [0.0], [0.0], [0.0]
    risk, escapes = [len(times)], [0]
    if escaped:
        cdf = stats.ecdf(stats.CensoredData(uncensored=escaped, right=censored)).cdf
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            band = cdf.confidence_interval(0.95, method="log-log")
        steps += [int(s) for s in cdf.quantiles]
        solved += [float(p) for p in cdf.probabilities]
        risk += [at_risk(s) for s in steps[1:]]
        escapes += [escaped.count(s) for s in steps[1:]]
        # The band is undefined (NaN) where the estimate is 0 or 1: it is then the point.
        bounds = [bound.evaluate(cdf.quantiles) for bound in (band.low, band.high)]
        for out, values in zip((low, high), bounds, strict=True):
            out += [
                float(p if math.isnan(b) else b)
                for p, b in zip(cdf.probabilities, values, strict=True)
            ]
    if steps[-1] < end:
        steps.append(int(end))
        for out in (solved, low, high):
            out.append(out[-1])
        risk.append(at_risk(int(end)))
        escapes.append(0)
    return {
        "steps": steps,
        "solved": solved,
        "low": low,
        "high": high,
        "at_risk": risk,
        "escapes": escapes,
    }
