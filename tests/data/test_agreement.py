"""Agreement statistics, each against a value worked out by hand in the comment beside it."""
from __future__ import annotations

import math
import random

import pytest

from speechrl.data.annotation.agreement import (
    annotator_stats, cohens_kappa, count_matrix, fleiss_kappa, pair_agreement,
)

PREFS = ("first", "second", "tie", "both_bad")

# Wikipedia's worked example ("Fleiss' kappa"): 10 items, 14 raters each, 5 categories.
WIKIPEDIA_FLEISS = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_wikipedia_example():
    # n = 14, so P_i = (sum_k c_ik² - 14) / (14 * 13) = (sum_k c_ik² - 14) / 182. Sums of squares by row:
    # 196, 60, 70, 94, 74, 98, 58, 46, 66, 66 -> numerators 182, 46, 56, 80, 60, 84, 44, 32, 52, 52,
    # which add up to 688, so P_a = 688 / 1820 = 0.378022.
    # Column totals 20, 28, 39, 21, 32 of 140 ratings: P_e = (400 + 784 + 1521 + 441 + 1024) / 140²
    # = 4170 / 19600 = 0.212755. Over the common denominator 254800:
    # kappa = (96320 - 54210) / (254800 - 54210) = 42110 / 200590 = 4211 / 20059 = 0.209930 (Wikipedia: 0.210).
    assert fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(4211 / 20059, abs=1e-12)


def test_fleiss_perfect_agreement_is_one():
    assert fleiss_kappa([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]]) == pytest.approx(1.0)


def test_fleiss_chance_level_is_zero():
    # Two raters, two categories. P_i = 0, 0, 1, 1 -> P_a = 1/2; each category has 4 of 8 ratings ->
    # P_e = 1/4 + 1/4 = 1/2; kappa = 0.
    assert fleiss_kappa([[1, 1], [1, 1], [2, 0], [0, 2]]) == pytest.approx(0.0, abs=1e-12)


def test_fleiss_with_two_raters_is_scotts_pi():
    # Wikipedia's Cohen example below as counts: 20 yes/yes, 15 no/no, 15 split. P_a = 35/50 = 0.7;
    # pooled yes = (25 + 30) / 100 = 0.55 -> P_e = 0.55² + 0.45² = 0.505; pi = 0.195 / 0.495 = 13/33.
    counts = [[2, 0]] * 20 + [[0, 2]] * 15 + [[1, 1]] * 15
    assert fleiss_kappa(counts) == pytest.approx(13 / 33, abs=1e-12)


def test_fleiss_varying_raters():
    # Items rated by 2, 2 and 3 raters: P_i = 1, 0, 1 -> P_a = 2/3. p_1 = mean(2/2, 1/2, 3/3) = 5/6,
    # p_2 = 1/6 -> P_e = 26/36; kappa = (24/36 - 26/36) / (10/36) = -0.2.
    assert fleiss_kappa([[2, 0], [1, 1], [3, 0]]) == pytest.approx(-0.2, abs=1e-12)
    # An item rated once leaves P_a alone but enters the shares: p_1 = (1 + 1/2 + 1 + 0) / 4 = 5/8,
    # p_2 = 3/8 -> P_e = 34/64 = 17/32; kappa = (2/3 - 17/32) / (15/32) = 13/45. Unrated items are ignored.
    assert fleiss_kappa([[2, 0], [1, 1], [3, 0], [0, 1], [0, 0]]) == pytest.approx(13 / 45, abs=1e-12)


def test_fleiss_undefined_and_bad_input():
    assert math.isnan(fleiss_kappa([[3, 0], [2, 0]]))  # one category only: P_e = 1
    with pytest.raises(ValueError, match="no items"):
        fleiss_kappa([])
    with pytest.raises(ValueError, match="two or more ratings"):
        fleiss_kappa([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="item 1 has 3 categories"):
        fleiss_kappa([[1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="whole number"):
        fleiss_kappa([[1, -1]])


def test_cohens_kappa_wikipedia_2x2():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15. p_o = 35/50 = 0.7.
    # A says yes 25/50 = 0.5, B 30/50 = 0.6 -> p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = 0.2 / 0.5 = 0.4.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


def test_cohens_kappa_perfect_chance_and_opposite():
    assert cohens_kappa(["first", "second", "tie"], ["first", "second", "tie"]) == pytest.approx(1.0)
    # p_o = 1/2, p_e = 1/2 * 1/2 + 1/2 * 1/2 = 1/2 -> 0
    assert cohens_kappa(["first", "first", "second", "second"], ["first", "second", "first", "second"]) == 0.0
    # p_o = 0, p_e = 1/2 -> -1
    assert cohens_kappa(["first", "second"], ["second", "first"]) == pytest.approx(-1.0)


def test_cohens_kappa_category_only_one_rater_used():
    # B never says "tie". p_o = 2/4; A: first 2, tie 2; B: first 2, second 2 -> p_e = 2*2/16 = 1/4;
    # kappa = (1/2 - 1/4) / (3/4) = 1/3.
    a, b = ["first", "first", "tie", "tie"], ["first", "first", "second", "second"]
    assert cohens_kappa(a, b) == pytest.approx(1 / 3)


def test_cohens_kappa_undefined_and_bad_input():
    assert math.isnan(cohens_kappa(["tie", "tie"], ["tie", "tie"]))  # p_e = 1
    with pytest.raises(ValueError, match="3 labels from the first rater, 2"):
        cohens_kappa(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="no items"):
        cohens_kappa([], [])


def test_cohens_kappa_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    a = [rng.choice(PREFS) for _ in range(200)]
    b = [x if rng.random() < 0.6 else rng.choice(PREFS[:3]) for x in a]
    assert cohens_kappa(a, b) == pytest.approx(metrics.cohen_kappa_score(a, b), abs=1e-12)


def test_pair_agreement():
    assert pair_agreement(["first", "first", "second"]) == pytest.approx(2 / 3)
    assert pair_agreement(["first", "second"]) == 0.5
    assert pair_agreement(["tie"]) == 1.0
    with pytest.raises(ValueError, match="no votes"):
        pair_agreement([])


def test_count_matrix():
    assert count_matrix([["first", "first", "tie"], ["both_bad"]], PREFS) == [[2, 0, 1, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="item 0 has the vote 'A'"):
        count_matrix([["A"]], PREFS)


JUDGMENTS = [  # (annotator, item, label)
    ("x", 1, "first"), ("y", 1, "first"), ("z", 1, "first"),
    ("x", 2, "tie"), ("y", 2, "first"), ("z", 2, "first"),
    ("x", 3, "first"), ("y", 3, "second"),
]


def test_annotator_stats_hand_worked():
    stats = annotator_stats(JUDGMENTS, PREFS, min_shared=2)
    assert list(stats) == ["x", "y", "z"]
    x, y, z = stats["x"], stats["y"], stats["z"]
    assert x.n_judgments == 3
    assert x.answer_rates == pytest.approx({"first": 2 / 3, "second": 0.0, "tie": 1 / 3, "both_bad": 0.0})
    # x against the others: item 1 first/first -> agrees; item 2 first/first vs tie -> no; item 3 second vs first -> no
    assert (x.majority_agreement, x.n_majority_items) == (pytest.approx(1 / 3), 3)
    # y: item 1 agrees; item 2 the others are tie/first, a tie, skipped; item 3 x said first, y second -> 1/2
    assert (y.majority_agreement, y.n_majority_items) == (0.5, 2)
    # z: item 1 agrees; item 2 skipped (tie/first); z did not judge item 3
    assert (z.majority_agreement, z.n_majority_items) == (1.0, 1)
    # x/y on items 1-3: x = first, tie, first; y = first, first, second. p_o = 1/3, p_e = 2*2/9 = 4/9
    # -> kappa = (3/9 - 4/9) / (5/9) = -0.2. x/z on items 1-2: p_o = 1/2, p_e = 1*2/4 -> 0.
    # y/z on items 1-2: both all "first" -> p_e = 1 -> nan.
    assert x.kappa_with == pytest.approx({"y": -0.2, "z": 0.0})
    assert y.kappa_with["x"] == pytest.approx(-0.2) and math.isnan(y.kappa_with["z"])
    assert list(annotator_stats(JUDGMENTS, PREFS, min_shared=3)["x"].kappa_with) == ["y"]


def test_annotator_stats_later_judgment_replaces_and_bad_label():
    stats = annotator_stats([("x", 1, "first"), ("x", 1, "tie")], PREFS)
    assert stats["x"].n_judgments == 1 and stats["x"].answer_rates["tie"] == 1.0
    assert math.isnan(stats["x"].majority_agreement) and stats["x"].n_majority_items == 0
    with pytest.raises(ValueError, match="annotator 'x' gave item 1 the label 'A'.*A/B order undone"):
        annotator_stats([("x", 1, "A")], PREFS)
