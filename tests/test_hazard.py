"""experiments.report.hazard against hand computations."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments.report.hazard import (
    hazard_ratio,
    kaplan_meier,
    mcnemar_paired,
    mcnemar_pooled,
    person_periods,
)


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
    got = hazard_ratio([(BASE, TREAT, 200)], baseline="constant")
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


# Per 100-step interval, at risk (escapes): baseline 4 (1), then 3 (1); treatment 10 (5),
# then 5 (3). The odds ratio is 3 in both intervals: (5/5) / (1/3) and (3/2) / (1/2).
BASE_2 = _summary([100, 200], [200, 200])
TREAT_2 = _summary([100] * 5 + [200] * 3, [200, 200])


def test_per_interval_baseline_gives_the_common_odds_ratio_of_the_intervals():
    # With a baseline term per interval, data whose intervals share one odds ratio are
    # fitted exactly: the estimate is that ratio.
    got = hazard_ratio([(BASE_2, TREAT_2, 100)])
    assert got["baseline_model"] == "stratum_interval"
    assert got["ratio"] == pytest.approx(3.0, rel=1e-6)
    assert got["ci"][0] < 3 < got["ci"][1] and 0 < got["p"] < 1
    assert got["events"] == [2, 8] and got["person_periods"] == [7, 15]
    # A baseline constant in time mixes the intervals: (8/7) / (2/5), not 3.
    constant = hazard_ratio([(BASE_2, TREAT_2, 100)], baseline="constant")
    assert constant["ratio"] == pytest.approx((8 / 7) / (2 / 5), rel=1e-6)


def test_cells_that_say_nothing_are_left_out_exactly():
    want = hazard_ratio([(BASE_2, TREAT_2, 100)])
    # The seeds that did not escape by step 200 observed longer: a third interval where
    # nobody escapes, and a fourth where only the treatment is at risk. The same estimate
    # and interval, from the same informative rows.
    longer = hazard_ratio(
        [(_summary([100, 200], [300, 300]), _summary([100] * 5 + [200] * 3 + [400], [400]), 100)]
    )
    assert longer["ratio"] == pytest.approx(want["ratio"], rel=1e-6)
    assert longer["se"] == pytest.approx(want["se"], rel=1e-6)
    assert longer["informative_person_periods"] == want["informative_person_periods"] == [7, 15]
    # A second stratum holding escapes only where the other read is not at risk.
    lonely = (_summary([], [100]), _summary([200], []), 100)
    pooled = hazard_ratio([(BASE_2, TREAT_2, 100), lonely])
    assert pooled["ratio"] == pytest.approx(3.0, rel=1e-6) and pooled["strata_used"] == 1


def test_pooled_strata_and_degenerate_cases():
    for model in ("stratum_interval", "shared_interval", "constant"):
        one = hazard_ratio([(BASE, TREAT, 200)], baseline=model)
        two = hazard_ratio([(BASE, TREAT, 200), (BASE, TREAT, 200)], baseline=model)
        # The same data twice: the same ratio, a standard error smaller by sqrt(2).
        assert two["ratio"] == pytest.approx(one["ratio"], rel=1e-6)
        assert two["se"] == pytest.approx(one["se"] / math.sqrt(2), rel=1e-4)
        # A stratum without any escape says nothing and is left out.
        silent = _summary([], [2000] * 8)
        three = hazard_ratio([(BASE, TREAT, 200), (silent, silent, 200)], baseline=model)
        assert three["strata_used"] == 1 and three["ratio"] == pytest.approx(one["ratio"])
    # No escape under the baseline: unbounded, said, not a number.
    silent = _summary([], [2000] * 8)
    unbounded = hazard_ratio([(silent, TREAT, 200)])
    assert unbounded["ratio"] is None and "baseline" in unbounded["reason"]
    assert hazard_ratio([(TREAT, silent, 200)])["reason"].endswith("estimated as 0")
    # Escapes under both reads, never in an interval where both were at risk.
    apart = hazard_ratio([(_summary([1000], []), _summary([200], []), 200)])
    assert apart["ratio"] is None and "both reads" in apart["reason"]
    # Within the informative intervals every treated seed escapes: no finite ratio.
    every = hazard_ratio([(_summary([200], [400]), _summary([200], []), 200)])
    assert every["ratio"] is None and "every seed" in every["reason"]
    nobody = _summary([], [])
    assert "baseline" in hazard_ratio([(nobody, nobody, 200)])["reason"]
    with pytest.raises(ValueError, match="baseline"):
        hazard_ratio([(BASE, TREAT, 200)], baseline="weibull")
    with pytest.raises(ValueError, match="no comparison group"):
        hazard_ratio([])
    with pytest.raises(ValueError, match="interval"):
        hazard_ratio([(BASE, TREAT, 0)])
    with pytest.raises(ValueError, match="tuple"):
        hazard_ratio([(BASE, TREAT)])


def test_mcnemar_is_the_binomial_test_on_discordant_pairs():
    base = {"seeds": [1, 2, 3, 4, 5, 6, 7], "is_solved": [1, 0, 0, 0, 0, 1, 0]}
    treat = {"seeds": [1, 2, 3, 4, 5, 6, 8], "is_solved": [1, 1, 1, 1, 1, 0, 1]}
    got = mcnemar_paired(base, treat)
    # Seeds 1-6 are paired: both 1, baseline only 1 (seed 6), treatment only 4.
    assert got["table"] == [[1, 1], [4, 0]] and got["num_pairs"] == 6
    assert got["p"] == pytest.approx(stats.binomtest(1, 5, 0.5).pvalue)
    assert mcnemar_paired(base, {"seeds": [9], "is_solved": [1]})["p"] is None
    with pytest.raises(ValueError, match="each seed once"):
        mcnemar_paired(base, {"seeds": [1, 1], "is_solved": [1, 0]})
    with pytest.raises(ValueError, match="summarize_read"):
        mcnemar_paired(base, {"seeds": [1]})


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


def test_kaplan_meier_on_five_seeds_by_hand():
    # Escapes at 200 and 600; censored at 400 (an unfinished run), 1000 and 1000.
    summary = _summary([200, 600], [400, 1000, 1000])
    curve = kaplan_meier(summary, 1000)
    assert curve["steps"] == [0, 200, 400, 600, 1000]
    assert curve["at_risk"] == [5, 5, 4, 3, 2] and curve["escapes"] == [0, 1, 0, 1, 0]
    # Not escaped: 4/5 after step 200; the seed censored at 400 leaves, so 3 are at risk
    # at 600, where one escapes: x 2/3.
    not_escaped = [1, 4 / 5, 4 / 5, 4 / 5 * 2 / 3, 4 / 5 * 2 / 3]
    np.testing.assert_allclose(curve["solved"], 1 - np.array(not_escaped))
    assert all(lo <= s <= hi for lo, s, hi in zip(curve["low"], curve["solved"], curve["high"]))
    with pytest.raises(ValueError, match="total steps"):
        kaplan_meier(summary, -1)


def test_pooled_mcnemar_adds_the_groups_pairs():
    base = {"seeds": [1, 2, 3], "is_solved": [1, 0, 0]}
    treat = {"seeds": [1, 2, 3], "is_solved": [0, 1, 1]}
    one = mcnemar_paired(base, treat)
    assert one["table"] == [[0, 1], [2, 0]]
    two = mcnemar_pooled([(base, treat), (base, treat)])
    # Six pairs, two discordant for the baseline and four for the treatment.
    assert two["table"] == [[0, 2], [4, 0]] and two["num_pairs"] == 6
    assert two["p"] == pytest.approx(stats.binomtest(2, 6, 0.5).pvalue)
    with pytest.raises(ValueError, match="no comparison group"):
        mcnemar_pooled([])
