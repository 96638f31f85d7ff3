"""bench_core.stats: intervals, ranks with ties and the verdict rule, against hand-computed cases; the
real-data floor against a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench_core import stats
from reproductions import ClaimResult, seed_values

T975_2DOF = 4.302652729911275   # Student t, 97.5% quantile, 2 degrees of freedom (tables)
T95_2DOF = 2.919985580355516    # 95% quantile, 2 dof
T95_4DOF = 2.131846786326649    # 95% quantile, 4 dof


def test_summary_by_hand():
    s = stats.summarize([10.0, 11.0, 12.0, float("nan"), None])
    assert (s.n, s.mean, s.sd) == (3, 11.0, 1.0)
    assert s.sem == pytest.approx(1 / math.sqrt(3))
    assert (s.lo, s.hi) == pytest.approx((11 - T975_2DOF / math.sqrt(3), 11 + T975_2DOF / math.sqrt(3)))
    assert s.text() == f"11.00 ± {T975_2DOF / math.sqrt(3):.2f} (n=3)"
    one = stats.summarize([4.0])
    assert one.n == 1 and one.mean == 4.0 and not one.has_interval and one.text() == "4.00 (1 seed)"
    assert stats.summarize([]).n == 0


def test_ranks_with_ties_by_hand():
    a = stats.summarize([10, 11, 12])        # [8.52, 13.48]
    b = stats.summarize([11, 12, 13])        # overlaps a
    c = stats.summarize([20, 21, 22])        # above both
    d = stats.summarize([1.0])               # one seed: no interval, no rank
    assert stats.rank_with_ties([a, b, c, d]) == [(1, True), (1, True), (3, False), (None, False)]
    # higher is better (precision): c is first
    assert stats.rank_with_ties([a, b, c], lower_is_better=False) == [(2, True), (2, True), (1, False)]
    assert [stats.rank_label(r, t, n) for (r, t), n in zip(stats.rank_with_ties([a, b, c, d]), (3, 3, 3, 1))] == \
        ["=1", "=1", "3", "1 seed"]


def test_paired_difference_by_hand():
    # A better than B by 1, 2, 3 on three shared seeds: d = 2, sd 1, se 1/sqrt(3), 2 dof
    a = {0: 10.0, 1: 10.0, 2: 10.0}
    b = {0: 11.0, 1: 12.0, 2: 13.0}
    d = stats.difference(a, b)
    assert d.paired and d.d == pytest.approx(2.0) and d.se == pytest.approx(1 / math.sqrt(3)) and d.dof == 2
    lo, hi = d.bound(0.95)
    assert lo == pytest.approx(2 - T95_2DOF / math.sqrt(3)) and hi == pytest.approx(2 + T95_2DOF / math.sqrt(3))


def test_welch_difference_by_hand():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]      # lists: unpaired
    d = stats.difference(a, b)
    va, vb = 1.0 / 3, 4.0 / 3
    assert not d.paired and d.d == pytest.approx(2.0) and d.se == pytest.approx(math.sqrt(va + vb))
    assert d.dof == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2))


def _pair(shift, noise, n=5, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(10, 1, n)
    return ({i: float(base[i]) for i in range(n)},
            {i: float(base[i] + shift + noise * rng.normal()) for i in range(n)})


def test_verdict_rule_pass_inconclusive_fail():
    # a known difference far beyond the noise passes
    a, b = _pair(shift=3.0, noise=0.2)
    v = stats.beats(a, b, names=("new", "old"))
    assert v.status == "pass" and v.why == "" and "paired t over 5 seeds" in v.text
    # the right direction inside the noise is inconclusive
    a, b = _pair(shift=0.1, noise=2.0)
    assert stats.beats(a, b).status == "inconclusive"
    # a reversed difference beyond the noise fails
    a, b = _pair(shift=-3.0, noise=0.2)
    v = stats.beats(a, b)
    assert v.status == "fail" and "worse" in v.why
    # a margin: beating by 3 is not beating by 5
    a, b = _pair(shift=3.0, noise=0.2)
    assert stats.beats(a, b, margin=5.0).status == "fail"
    # higher is better
    assert stats.beats({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.5, 1: 0.45, 2: 0.4}, lower_is_better=False).status == "pass"
    # nothing on one side: not run; one value each: inconclusive (no noise estimate)
    assert stats.beats({}, b).status == "not run"
    assert stats.beats([1.0], [2.0]).status == "inconclusive"


def test_verdict_threshold_is_the_one_sided_bound():
    # d = 2, se = 1/sqrt(5) * sd; the margin right below / above the 95% lower bound flips pass / inconclusive
    diffs = [1.0, 2.0, 3.0, 1.5, 2.5]
    a = {i: 0.0 for i in range(5)}
    b = {i: v for i, v in enumerate(diffs)}
    sd = float(np.std(diffs, ddof=1))
    lcb = 2.0 - T95_4DOF * sd / math.sqrt(5)
    assert stats.beats(a, b, margin=lcb - 1e-6).status == "pass"
    assert stats.beats(a, b, margin=lcb + 1e-6).status == "inconclusive"


def test_equivalence_and_bounds():
    a, b = _pair(shift=0.05, noise=0.05)
    assert stats.equivalent(a, b, tol=0.5).status == "pass"
    a, b = _pair(shift=3.0, noise=0.1)
    assert stats.equivalent(a, b, tol=0.5).status == "fail"
    a, b = _pair(shift=0.3, noise=1.0)
    assert stats.equivalent(a, b, tol=0.5).status == "inconclusive"
    assert stats.at_most([1.0, 1.1, 0.9], 2.0).status == "pass"
    assert stats.at_most([3.0, 3.1, 2.9], 2.0).status == "fail"
    assert stats.at_most([1.0, 3.0, 2.0], 2.2).status == "inconclusive"
    assert stats.at_least([5.0, 5.2, 4.8], 4.0, what="bits").status == "pass"


def test_claim_result_from_verdict_and_seed_values():
    import pandas as pd

    v = stats.beats([1.0, 1.1, 0.9], [5.0, 5.1, 4.9])
    r = ClaimResult.of(v, prefix="10 NFE: ")
    assert r.status == "pass" and r.ours.startswith("10 NFE: FID A") and r.why == ""
    df = pd.DataFrame({"seed": [0, 1, 1, 0], "train_seed": [0, 0, 0, 1], "fid": [1.0, 2.0, 4.0, float("nan")]})
    assert seed_values(df) == {(0, 0): 1.0, (0, 1): 3.0}


def test_real_data_floor_is_the_mean_over_subsets():
    """The floor's mean and spread equal a direct computation: the FID of each random subset of real images
    through the full image_metrics path, with the same permutations."""
    from bench_core.metrics.extractors import digits_extractor, load_digits_uint8
    from bench_core.metrics.fidelity import image_metrics, real_data_floor

    ext = digits_extractor()
    ref = load_digits_uint8()[0][:600]
    floor = real_data_floor(ref, 200, extractor=ext, reference_name="t", subsets=20, seed=3)
    g = torch.Generator().manual_seed(3)
    direct = [image_metrics(ref[torch.randperm(600, generator=g)[:200]], ref, extractor=ext,
                            reference_name="t")["fid"] for _ in range(20)]
    assert floor["n_subsets"] == 20 and floor["n"] == 200
    assert floor["values"] == pytest.approx(direct, rel=1e-6)
    assert floor["mean"] == pytest.approx(np.mean(direct), rel=1e-6)
    assert floor["sd"] == pytest.approx(np.std(direct, ddof=1), rel=1e-6)
    assert floor["sd"] > 0      # subsets differ: one subset is one draw, not the floor
    with pytest.raises(ValueError, match="at least 2 subsets"):
        real_data_floor(ref, 200, extractor=ext, reference_name="t", subsets=1)
