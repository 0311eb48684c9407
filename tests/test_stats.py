"""Intervals, paired tests and verdicts (adaskip/eval/stats.py) on hand-made cases with known answers."""

from __future__ import annotations

import math

import pytest

from adaskip.eval import stats


def test_clopper_pearson_known_values():
    # textbook values: 5/10 -> (0.1871, 0.8129); 0/10 -> (0, 1 - 0.025 ** (1 / 10)); 10/10 -> (0.025 ** 0.1, 1)
    ci = stats.proportion_ci(5, 10)
    assert (ci.estimate, round(ci.low, 4), round(ci.high, 4)) == (0.5, 0.1871, 0.8129)
    ci = stats.proportion_ci(0, 10)
    assert ci.low == 0.0 and ci.high == pytest.approx(1 - 0.025 ** 0.1, abs=1e-9)
    ci = stats.proportion_ci(10, 10)
    assert ci.high == 1.0 and ci.low == pytest.approx(0.025 ** 0.1, abs=1e-9)
    # 100 questions at 70%: about +-9 points
    ci = stats.proportion_ci(70, 100)
    assert 0.59 < ci.low < 0.61 and 0.78 < ci.high < 0.80
    assert math.isnan(stats.proportion_ci(0, 0).low)
    with pytest.raises(ValueError):
        stats.proportion_ci(3, 2)


def test_mcnemar_exact_known_answers():
    # 100 questions, we alone answer 10, they alone none: p = 2 * 0.5^10; difference +10 points, interval
    # m/n * (2 * CP(10/10) - 1) = 0.1 * (2 * 0.025^(1/10) - 1) .. 0.1
    ours = [1] * 10 + [1] * 50 + [0] * 40
    theirs = [0] * 10 + [1] * 50 + [0] * 40
    c = stats.compare_binary(ours, theirs)
    assert c.discordant == (10, 0) and c.p_value == pytest.approx(2 * 0.5 ** 10)
    assert c.difference.estimate == pytest.approx(0.1)
    assert c.difference.low == pytest.approx(0.1 * (2 * 0.025 ** 0.1 - 1)) and c.difference.high == pytest.approx(0.1)
    assert c.verdict == "beats"
    assert stats.compare_binary(theirs, ours).verdict == "loses"
    # 3 vs 2 discordant of 100: p = 1, conditional interval 0.05 * (2 * CP(3/5) - 1) = (-0.035, +0.045); but the
    # discordant rate itself may be up to 12.5% (97.5% bound), so a tie within 5 points is not established
    ours = [1, 1, 1, 0, 0] + [1] * 60 + [0] * 35
    theirs = [0, 0, 0, 1, 1] + [1] * 60 + [0] * 35
    c = stats.compare_binary(ours, theirs)
    assert c.p_value == 1.0 and c.verdict == "inconclusive"
    assert c.difference.low == pytest.approx(-0.0353, abs=1e-4) and c.difference.high == pytest.approx(0.0447, abs=1e-4)
    # the same answers on 120 questions: the discordant rate is below 1 - 0.0125^(1/120) = 3.6% -> a tie
    same = stats.compare_binary([1, 0, 1] * 40, [1, 0, 1] * 40)
    assert (same.p_value, same.difference.low, same.difference.high, same.verdict) == (1.0, 0.0, 0.0, "ties")
    # ... but not on 5 questions (up to 52% of questions could disagree)
    assert stats.compare_binary([1, 0, 1, 1, 0], [1, 0, 1, 1, 0]).verdict == "inconclusive"
    # 1 vs 1 of 400: discordant rate <= 1.8%: a tie
    assert stats.compare_binary([1, 0] + [1] * 398, [0, 1] + [1] * 398).verdict == "ties"


def test_mcnemar_interval_and_test_agree():
    """The conditional exact interval is the test's dual: it excludes 0 exactly when p < 0.05 (beats / loses)."""
    for win in range(0, 25):
        for loss in range(0, 25):
            n = win + loss + 20
            ours = [1] * win + [0] * loss + [1] * 10 + [0] * 10
            theirs = [0] * win + [1] * loss + [1] * 10 + [0] * 10
            c = stats.compare_binary(ours, theirs, margin=0.0)
            decided = c.verdict in ("beats", "loses")
            assert decided == (c.p_value < 0.05), (win, loss, c)
            assert c.n == n


def test_paired_bootstrap_and_sign_test():
    base = [0.1 * i for i in range(20)]
    better = [x + 0.1 for x in base]  # every unit +0.1: interval [0.1, 0.1], sign test 2 * 0.5^20
    c = stats.compare_continuous(better, base, higher_better=True, margin=0.02)
    assert c.verdict == "beats" and c.difference.low == pytest.approx(0.1) and c.difference.high == pytest.approx(0.1)
    assert c.p_value == pytest.approx(2 * 0.5 ** 20)
    # KL: lower is better, so a uniformly lower KL beats and a higher one loses
    assert stats.compare_continuous(base, better, higher_better=False, margin=0.02).verdict == "beats"
    assert stats.compare_continuous(better, base, higher_better=False, margin=0.02).verdict == "loses"
    # zero-mean differences: large ones are inconclusive, tiny ones a tie
    wide = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]
    assert stats.compare_continuous(wide, base, True, margin=0.02).verdict == "inconclusive"
    tiny = [x + (0.001 if i % 2 else -0.001) for i, x in enumerate(base)]
    c = stats.compare_continuous(tiny, base, True, margin=0.02)
    assert c.verdict == "ties" and c.p_value == 1.0
    # too few pairs for a bootstrap: no interval, no verdict
    assert stats.compare_continuous([1.0, 2.0], [0.0, 0.0], True, margin=0.1).verdict == "n/a"
    with pytest.raises(ValueError):
        stats.compare_continuous([1.0], [1.0, 2.0], True, 0.1)


def test_mean_ci_is_seeded_and_sane():
    values = list(range(100))  # mean 49.5, sd 29.0: a normal-theory interval is 49.5 +- 5.7
    a, b = stats.mean_ci(values), stats.mean_ci(values)
    assert a == b and a.estimate == 49.5
    assert 42.5 < a.low < 45.0 and 54.0 < a.high < 56.5
    assert stats.mean_ci(values, seed=1) != a  # the seed is what fixes it
    assert stats.mean_ci([0.3] * 10).low == 0.3 == stats.mean_ci([0.3] * 10).high
    short = stats.mean_ci([1.0, 2.0])
    assert short.estimate == 1.5 and math.isnan(short.low)
