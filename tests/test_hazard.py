"""experiments.report.hazard against hand computations."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments.report.hazard import hazard_ratio, kaplan_meier, mcnemar_paired, person_periods


def _summary(escapes, censors, solved_seeds=None):
    n = len(escapes) + len(censors)
    return {
        "escape_step": list(escapes) + [None] * len(censors),
        "censor_step": [None] * len(escapes) + list(censors),
        "seeds": list(range(n)),
        "is_solved": [True] * len(escapes) + [False] * len(censors),
    }


BASE = _summary([1000], [2000] * 7)
TREAT = _summary([400, 600, 1200], [2000] * 5)


def test_person_periods_by_hand():
    index, event = person_periods(TREAT, 200)
    # Escapes at 400, 600, 1200: 2 + 3 + 6 rows; 5 seeds censored at 2000: 10 rows each.
    assert len(index) == 2 + 3 + 6 + 50
    assert event.sum() == 3
    np.testing.assert_array_equal(index[:2], [1, 2])
    assert event[1] == 1 and event[0] == 0
    # An escape between evaluations counts in the interval that ends at or after it.
    index, event = person_periods(_summary([250], []), 200)
    np.testing.assert_array_equal(index, [1, 2])
    np.testing.assert_array_equal(event, [0, 1])
    with pytest.raises(ValueError, match="interval"):
        person_periods(TREAT, 0)


def test_constant_hazard_ratio_is_the_odds_ratio_of_the_person_periods():
    got = hazard_ratio([(BASE, TREAT, 200)])
    at_risk_base, events_base = 5 + 7 * 10, 1
    at_risk_treat, events_treat = 2 + 3 + 6 + 5 * 10, 3
    odds = lambda e, r: e / (r - e)
    want = odds(events_treat, at_risk_treat) / odds(events_base, at_risk_base)
    assert got["ratio"] == pytest.approx(want, rel=1e-6)
    # Wald standard error of a log odds ratio: sqrt of the sum of 1 / cell counts.
    se = math.sqrt(
        1 / events_treat
        + 1 / (at_risk_treat - events_treat)
        + 1 / events_base
        + 1 / (at_risk_base - events_base)
    )
    assert got["se"] == pytest.approx(se, rel=1e-4)
    assert got["ci"][0] == pytest.approx(want * math.exp(-1.959964 * se), rel=1e-4)
    assert got["events"] == [1, 3] and got["person_periods"] == [75, 61]
    assert got["p"] == pytest.approx(2 * stats.norm.sf(math.log(want) / se), rel=1e-4)


def test_pooled_strata_and_degenerate_cases():
    one = hazard_ratio([(BASE, TREAT, 200)])
    two = hazard_ratio([(BASE, TREAT, 200), (BASE, TREAT, 200)])
    # The same data twice: the same ratio, a standard error smaller by sqrt(2).
    assert two["ratio"] == pytest.approx(one["ratio"], rel=1e-6)
    assert two["se"] == pytest.approx(one["se"] / math.sqrt(2), rel=1e-4)
    # A stratum without any escape says nothing and is left out.
    silent = _summary([], [2000] * 8)
    three = hazard_ratio([(BASE, TREAT, 200), (silent, silent, 200)])
    assert three["strata_used"] == 1 and three["ratio"] == pytest.approx(one["ratio"])
    # No escape under the baseline: unbounded, said, not a number.
    unbounded = hazard_ratio([(silent, TREAT, 200)])
    assert unbounded["ratio"] is None and "baseline" in unbounded["reason"]
    assert hazard_ratio([(BASE, TREAT, 200)], baseline="interval")["ratio"] > 0
    with pytest.raises(ValueError, match="baseline"):
        hazard_ratio([(BASE, TREAT, 200)], baseline="weibull")


def test_mcnemar_is_the_binomial_test_on_discordant_pairs():
    base = {"seeds": [1, 2, 3, 4, 5, 6, 7], "is_solved": [1, 0, 0, 0, 0, 1, 0]}
    treat = {"seeds": [1, 2, 3, 4, 5, 6, 8], "is_solved": [1, 1, 1, 1, 1, 0, 1]}
    got = mcnemar_paired(base, treat)
    # Seeds 1-6 are paired: both 1, baseline only 1 (seed 6), treatment only 4.
    assert got["table"] == [[1, 1], [4, 0]] and got["num_pairs"] == 6
    assert got["p"] == pytest.approx(stats.binomtest(1, 5, 0.5).pvalue)


def test_kaplan_meier_band_is_greenwood_log_log_by_hand():
    curve = kaplan_meier(TREAT, 2000)
    assert curve["steps"] == [0, 400, 600, 1200, 2000]
    np.testing.assert_allclose(curve["solved"], [0, 1 / 8, 2 / 8, 3 / 8, 3 / 8])
    # Survival S = Π (1 - 1/n) with n = 8, 7, 6 at risk; Greenwood's variance of
    # log S, the log-log transform, and the band of the solved fraction 1 - S.
    at_risk = np.array([8, 7, 6])
    survival = np.cumprod(1 - 1 / at_risk)
    greenwood = np.cumsum(1 / (at_risk * (at_risk - 1)))
    half = 1.959964 * np.sqrt(greenwood) / np.abs(np.log(survival))
    low_s, high_s = survival ** np.exp(half), survival ** np.exp(-half)
    np.testing.assert_allclose(curve["low"][1:4], 1 - high_s, rtol=1e-5)
    np.testing.assert_allclose(curve["high"][1:4], 1 - low_s, rtol=1e-5)
    assert kaplan_meier(_summary([], [2000]), 2000)["solved"] == [0.0, 0.0]
