"""Scaling laws: recovery of known parameters under noise, replicate fits, model selection, joint law."""
from __future__ import annotations

import numpy as np
import pytest

from biovfm.analysis import laws
from biovfm.analysis.fits import loglog_fit

X = np.geomspace(2e5, 3e8, 7)


def saturating(x, a=0.25, b=0.4, c=0.06):
    return 1.0 - (a * (x / x.min()) ** -b + c)


def test_saturating_fit_recovers_known_parameters_from_noisy_data() -> None:
    rng = np.random.default_rng(1)
    est = [laws.saturating_fit(X, saturating(X) + rng.normal(0, 0.002, X.size)) for _ in range(20)]
    for name, true in (("a", 0.25), ("b", 0.4), ("c", 0.06)):
        assert np.median([e[name] for e in est]) == pytest.approx(true, rel=0.15), name


def test_saturating_fit_respects_bounds_on_flat_or_falling_data() -> None:
    flat = laws.saturating_fit(X, np.full(X.size, 0.8))
    assert flat["a"] >= 0 and 0 <= flat["c"] <= 1
    assert laws.saturating_predict(flat, X) == pytest.approx(np.full(X.size, 0.8), abs=1e-6)
    falling = laws.saturating_fit(X, np.linspace(0.9, 0.8, X.size))
    assert falling["a"] >= 0 and falling["b"] > 0  # cannot bend upwards: the bounds hold


def test_replicate_fits_match_point_fits() -> None:
    rng = np.random.default_rng(2)
    y = 0.7 * (X / 1e6) ** 0.01
    reps = y + rng.normal(0, 0.003, (50, X.size))
    slope, _ = laws.loglog_replicates(X, reps)
    want = [loglog_fit(X, 100 * r)["slope"] for r in reps]
    assert slope == pytest.approx(want, abs=1e-12)
    sat = laws.saturating_replicates(X, saturating(X)[None].repeat(3, axis=0))
    assert sat["b"] == pytest.approx([0.4] * 3, rel=0.05)  # the profile grid lands on the true exponent


def test_selection_by_held_out_error_prefers_the_true_form() -> None:
    y = saturating(X, a=0.3, b=0.8, c=0.08)  # strongly saturating
    assert laws.loo_rmse(laws.SATURATING, X, y) < laws.loo_rmse(laws.LOGLOG, X, y) / 5
    assert np.isnan(laws.loo_rmse(laws.SATURATING, X[:3], y[:3]))  # leave one out of 3 leaves 2: no fit


def test_too_few_points_refused_clearly() -> None:
    assert not laws.enough_points(laws.SATURATING, [1.0, 2.0])
    with pytest.raises(ValueError, match="needs >= 3 distinct x"):
        laws.fit(laws.SATURATING, np.array([1.0, 2.0]), np.array([0.5, 0.6]))


def test_joint_law_recovers_model_and_data_terms() -> None:
    n = np.repeat(np.geomspace(1e5, 1e7, 4), 3)
    d = np.tile([500.0, 2000.0, 8000.0], 4)
    auc = 1 - (0.05 + 0.3 * (n / n.min()) ** -0.3 + 0.1 * (d / d.min()) ** -0.5)
    p = laws.joint_fit(n, d, auc)
    assert p["alpha"] == pytest.approx(0.3, rel=0.05) and p["beta"] == pytest.approx(0.5, rel=0.1)
    assert laws.joint_predict(p, n, d) == pytest.approx(auc, abs=1e-4)
