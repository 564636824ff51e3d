"""Confidence intervals and paired differences against scipy.stats; curve statistics against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from lora_one_train.stats import (
    band,
    betainc,
    by_method,
    curve_auc,
    mean_ci,
    paired_difference,
    steps_to_level,
    t_cdf,
    t_quantile,
    value_at,
    values_at,
)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 29, 200])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 50.0])
@pytest.mark.parametrize("df", [1, 2, 5.5, 40])
def test_t_cdf_and_betainc_match_scipy(t, df):
    assert t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), rel=1e-10, abs=1e-14)
    x = df / (df + t * t)
    from scipy.special import betainc as sp_betainc

    assert betainc(df / 2, 0.5, x) == pytest.approx(sp_betainc(df / 2, 0.5, x), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("n", [2, 3, 5, 12])
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_mean_ci_matches_scipy_interval(n, level):
    x = np.random.default_rng(n).normal(0.6, 0.05, n)
    ci = mean_ci(x, level=level)
    low, high = sps.t.interval(level, n - 1, loc=x.mean(), scale=sps.sem(x))
    assert ci["mean"] == pytest.approx(x.mean()) and ci["n"] == n
    assert ci["low"] == pytest.approx(low, rel=1e-9) and ci["high"] == pytest.approx(high, rel=1e-9)
    assert ci["sd"] == pytest.approx(np.std(x, ddof=1))


def test_mean_ci_of_one_seed_has_no_interval_and_nan_is_an_error():
    ci = mean_ci([0.5])
    assert ci["mean"] == 0.5 and ci["low"] is None and ci["half_width"] is None
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_paired_difference_matches_scipy_paired_t_test():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.05, 5)  # large seed-to-seed noise shared by both methods
    ref = 0.60 + seed_effect
    method = 0.62 + seed_effect + rng.normal(0, 0.005, 5)
    d = paired_difference(dict(enumerate(method)), dict(enumerate(ref)))
    res = sps.ttest_rel(method, ref)
    low, high = res.confidence_interval(0.95)
    assert d["low"] == pytest.approx(low, rel=1e-9) and d["high"] == pytest.approx(high, rel=1e-9)
    assert d["low"] > 0  # pairing removes the seed noise: the gain is significant ...
    unpaired = mean_ci(method)["low"] - mean_ci(ref)["high"]
    assert unpaired < 0  # ... which the unpaired intervals (overlapping) could not show


def test_paired_difference_pairs_by_seed_not_by_position():
    d = paired_difference({2: 1.0, 0: 3.0, 1: 2.0, 7: 9.0}, {0: 2.5, 1: 1.5, 2: 0.5})
    assert d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(0.5) and d["sd"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_by_method_against_the_reference():
    values = {"lora": {0: 0.5, 1: 0.6, 2: 0.7}, "lora-one": {0: 0.55, 1: 0.62, 2: 0.74}, "pissa": {0: 0.5, 1: 0.5}}
    out = by_method(values)
    assert set(out) == {"lora-one", "pissa"}
    assert out["lora-one"]["mean"] == pytest.approx(np.mean([0.05, 0.02, 0.04]))
    assert out["pissa"]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="reference"):
        by_method(values, reference="full")


def _history(steps, losses):
    out = []
    for s, v in zip(steps, losses):
        out += [{"step": s, "loss": v + 0.1, "grad_norm": 1.0}, {"step": s, "eval/answer_loss": v, "eval/score": None}]
    return out


def test_steps_to_level_interpolates_the_first_crossing():
    h = _history([0, 25, 50, 75], [2.0, 1.0, 1.4, 0.6])
    assert steps_to_level(h, 1.0) == 25.0
    assert steps_to_level(h, 1.5) == pytest.approx(12.5)
    assert steps_to_level(h, 0.8) == pytest.approx(50 + 25 * (1.4 - 0.8) / 0.8)  # after the bump
    assert steps_to_level(h, 2.5) == 0.0 and steps_to_level(h, 0.1) is None


def test_loss_at_fixed_steps_and_auc_closed_form():
    steps = np.arange(0, 151, 25)
    losses = 1.0 + np.exp(-steps / 50.0)  # exact for the trapezoid rule on a line only, so compare to numpy
    h = _history(steps.tolist(), losses.tolist())
    assert values_at(h, [0, 50, 60, 200]) == {
        0: 2.0,
        50: pytest.approx(losses[2]),
        60: pytest.approx(np.interp(60, steps, losses)),
        200: None,
    }
    assert curve_auc(h) == pytest.approx(np.trapezoid(losses, steps) / 150)
    line = _history([0, 10, 40], [3.0, 2.5, 1.0])  # a straight line: the mean of its ends
    assert curve_auc(line) == pytest.approx(2.0)
    assert value_at(line, 25) == pytest.approx(1.75)
    with pytest.raises(ValueError, match=">= 2"):
        curve_auc(line[:2])


def test_curve_nan_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        steps_to_level(_history([0, 10], [1.0, float("nan")]), 0.5)


def test_band_over_seeds_uses_common_steps_and_t_interval():
    hs = [_history([0, 25, 50], [2.0, 1.0 + d, 0.8 + d]) for d in (0.0, 0.1, 0.2)]
    hs[2] = hs[2][:-2] + _history([60], [0.5])  # this seed lacks step 50
    b = band(hs)
    assert b["step"] == [0.0, 25.0]
    low, high = sps.t.interval(0.95, 2, loc=1.1, scale=sps.sem([1.0, 1.1, 1.2]))
    assert (
        b["mean"][1] == pytest.approx(1.1) and b["low"][1] == pytest.approx(low) and b["high"][1] == pytest.approx(high)
    )
