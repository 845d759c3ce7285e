"""How much annotators agree: Fleiss' and Cohen's kappa, majority agreement, per-annotator summaries.

Pure functions over labels (the app undoes the randomized A/B order first). Undefined kappas are nan,
never 0 or 1: with expected agreement 1 (all ratings in one category) agreement beyond chance cannot
be measured, and a dashboard should show "n/a", not a number that reads as perfect or chance.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

# kappas below this many shared items swing too much to compare annotators by
MIN_SHARED_ITEMS = 10


def _kappa(observed: float, expected: float) -> float:
    if math.isclose(expected, 1.0, rel_tol=0.0, abs_tol=1e-12):
        return math.nan
    return (observed - expected) / (1.0 - expected)


def fleiss_kappa(counts: Iterable[Sequence[int]]) -> float:
    """Fleiss' kappa of an items × categories matrix: counts[i][k] raters put item i in category k.

    Gwet's generalized form, so items may have different rater counts n_i (equal to Fleiss' when all
    match): P_a = mean_{n_i>=2} sum_k c_ik (c_ik - 1) / (n_i (n_i - 1)), p_k = mean_{n_i>=1} c_ik / n_i,
    P_e = sum_k p_k², kappa = (P_a - P_e) / (1 - P_e). Items rated once count towards p_k only.
    """
    rows = [list(row) for row in counts]
    if not rows:
        raise ValueError("fleiss_kappa: no items given")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"fleiss_kappa: item {i} has {len(row)} categories, item 0 has {width}")
        if any(c < 0 or c != int(c) for c in row):
            raise ValueError(f"fleiss_kappa: item {i} has a count that is not a whole number >= 0: {row}")
    rated = [row for row in rows if sum(row) > 0]
    multi = [row for row in rated if sum(row) >= 2]
    if not multi:
        raise ValueError("fleiss_kappa: no item has two or more ratings, so agreement is undefined")
    observed = sum(sum(c * (c - 1) for c in row) / (sum(row) * (sum(row) - 1)) for row in multi) / len(multi)
    p = [sum(row[k] / sum(row) for row in rated) / len(rated) for k in range(width)]
    return _kappa(observed, sum(pk * pk for pk in p))


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items (a[i] and b[i] are for item i).

    A category neither rater used adds 0 to both agreements, so no list of possible categories is
    needed; nan when both raters gave one and the same label to every item.
    """
    if len(a) != len(b):
        raise ValueError(f"cohens_kappa: {len(a)} labels from the first rater, {len(b)} from the second")
    if not a:
        raise ValueError("cohens_kappa: no items given")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    return _kappa(observed, expected)


def pair_agreement(votes: Sequence[Hashable]) -> float:
    """The fraction of one item's votes that agree with its most common vote (1.0 for a single vote).

    With a tie for the most common vote the fraction is the same whichever is called the majority.
    """
    if not votes:
        raise ValueError("pair_agreement: no votes given")
    return Counter(votes).most_common(1)[0][1] / len(votes)


def count_matrix(votes_by_item: Iterable[Iterable[str]], categories: Sequence[str]) -> list[list[int]]:
    """The items × categories counts fleiss_kappa takes, from each item's list of votes."""
    index = {c: k for k, c in enumerate(categories)}
    matrix = []
    for i, votes in enumerate(votes_by_item):
        row = [0] * len(categories)
        for vote in votes:
            if vote not in index:
                raise ValueError(f"count_matrix: item {i} has the vote {vote!r}, not one of {tuple(categories)}")
            row[index[vote]] += 1
        matrix.append(row)
    return matrix


@dataclass
class AnnotatorStats:
    """One annotator's judgments summarized; see annotator_stats."""

    annotator: Hashable
    n_judgments: int  # distinct items judged
    answer_rates: dict[str, float]  # share of their judgments per category, every category listed
    majority_agreement: float  # share agreeing with the others' majority; nan where never defined
    n_majority_items: int  # items that share was taken over
    kappa_with: dict[Hashable, float] = field(default_factory=dict)  # Cohen's kappa per other annotator


def annotator_stats(
    judgments: Iterable[tuple[Hashable, Hashable, str]],
    categories: Sequence[str],
    min_shared: int = MIN_SHARED_ITEMS,
) -> dict[Hashable, AnnotatorStats]:
    """Per annotator: judgment count, answer rates, agreement with the others, kappa with each other.

    A later judgment of an item replaces an earlier one (a changed mind). Majority agreement is
    leave-one-out, against the most common label of the *other* annotators, skipping items nobody else
    judged or where their top label ties. Cohen's kappa needs at least `min_shared` items in common.
    """
    labels: dict[Hashable, dict[Hashable, str]] = {}  # annotator -> item -> label
    by_item: dict[Hashable, dict[Hashable, str]] = {}  # item -> annotator -> label
    allowed = set(categories)
    for annotator, item, label in judgments:
        if label not in allowed:
            raise ValueError(
                f"annotator_stats: annotator {annotator!r} gave item {item!r} the label {label!r}, "
                f"not one of {tuple(categories)} (was the A/B order undone?)"
            )
        labels.setdefault(annotator, {})[item] = label
        by_item.setdefault(item, {})[annotator] = label

    stats = {}
    for annotator, mine in labels.items():
        counts = Counter(mine.values())
        agree = total = 0
        for item, label in mine.items():
            others = Counter(v for who, v in by_item[item].items() if who != annotator).most_common(2)
            if not others or (len(others) == 2 and others[0][1] == others[1][1]):
                continue
            total += 1
            agree += label == others[0][0]
        kappas = {}
        for other, theirs in labels.items():
            shared = [item for item in mine if item in theirs]
            if other != annotator and len(shared) >= min_shared:
                kappas[other] = cohens_kappa([mine[i] for i in shared], [theirs[i] for i in shared])
        stats[annotator] = AnnotatorStats(
            annotator=annotator,
            n_judgments=len(mine),
            answer_rates={c: counts[c] / len(mine) for c in categories},
            majority_agreement=agree / total if total else math.nan,
            n_majority_items=total,
            kappa_with=kappas,
        )
    return stats
