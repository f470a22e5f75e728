"""The statistics of the reproduction tables, against scipy.stats."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cbnorm.experiments.stats import claim_verdict, comparison, interval, paired, verdict


class TestInterval:
    def test_mean_std_and_half_width_match_scipy(self):
        values = [86.1, 87.4, 85.9, 86.8]
        got = interval(values)
        low, high = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
        assert got.n == 4
        assert got.mean == pytest.approx(np.mean(values))
        assert got.std == pytest.approx(np.std(values, ddof=1))
        assert got.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2)
        assert (got.low, got.high) == pytest.approx((low, high))

    def test_non_finite_values_are_left_out(self):
        assert interval([1.0, math.nan, 3.0]) == interval([1.0, 3.0])

    def test_one_value_has_no_interval(self):
        got = interval([0.5])
        assert got.mean == 0.5 and math.isnan(got.half_width) and got.cell() == "0.50"

    def test_no_value(self):
        assert interval([]).cell() == "—"


class TestPaired:
    def test_matches_scipy_ttest_rel(self):
        rng = np.random.default_rng(0)
        baseline = rng.normal(80, 2, 5)
        values = baseline + rng.normal(0.7, 0.4, 5)
        got = paired(values, baseline)
        low, high = scipy_stats.ttest_rel(values, baseline).confidence_interval(0.95)
        assert (got.low, got.high) == pytest.approx((low, high))

    def test_seed_counts_must_match(self):
        with pytest.raises(ValueError, match="one baseline value per seed, got 3 values and 2"):
            paired([1, 2, 3], [1, 2])


class TestVerdict:
    def test_better_worse_and_no_difference(self):
        base = [80.0, 81.0, 82.0, 80.5]
        assert verdict(paired([81.0, 82.1, 83.0, 81.4], base)) == "better"
        assert verdict(paired([79.0, 80.1, 81.0, 79.4], base)) == "worse"
        tie = paired([80.5, 80.6, 81.9, 80.7], base)
        assert verdict(tie) == f"no difference detected (±{tie.half_width:.2f})"

    def test_lower_is_better_for_errors(self):
        assert verdict(paired([1.0, 2.0, 3.0], [2.0, 3.1, 4.0]), higher_is_better=False) == "better"

    def test_one_seed_has_no_verdict(self):
        assert verdict(paired([1.0], [0.0])) == "no interval (1 paired seed)"

    def test_comparison_row(self):
        row = comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.1])
        assert row["verdict"] == "better" and row["difference"]["mean"] == pytest.approx(0.9667, abs=1e-4)
        assert "verdict" not in comparison([1.0, 2.0], None)


class TestClaimVerdict:
    @pytest.mark.parametrize("diffs, claimed, expected", [
        ([1.0, 1.2, 1.4], 1.0, "confirmed"),
        ([0.3, 0.35, 0.4], 1.5, "confirmed in direction, smaller than claimed"),
        ([-0.1, 0.1, 0.0], 1.0, "refuted"),
        ([-2.0, -2.2, -1.9], 1.0, "refuted"),
    ])
    def test_verdicts(self, diffs, claimed, expected):
        assert claim_verdict(interval(diffs), claimed) == expected

    def test_inconclusive_names_the_half_width(self):
        wide = interval([-3.0, 4.0, 0.5])
        assert claim_verdict(wide, 1.0) == f"inconclusive (±{wide.half_width:.2f})"

    def test_claim_must_be_a_gain(self):
        with pytest.raises(ValueError, match="claimed gain > 0, got -1"):
            claim_verdict(interval([1.0, 2.0]), -1)
