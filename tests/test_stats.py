"""The statistics behind every accuracy table, against values worked out by hand.

Pure functions and synthetic outcomes only (no server), so these run in the fast suite.
"""

from __future__ import annotations

import math

import pytest

from loopserve.benchmarks import stats
from loopserve.benchmarks.accuracy import Outcome, family_weights, paired_tests, summarize
from loopserve.benchmarks.plots import pareto_front
from loopserve.benchmarks.tasks import Example
from loopserve.server.flops import FlopsModel, ModelShape
from loopserve.server.loop_plan import LoopPlan


def test_wilson_interval_matches_known_values():
    low, high = stats.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert stats.wilson_interval(10, 10)[1] == 1.0
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 2)


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 2 * P(Bin(10, 1/2) <= 2) = 0.109375
        (8, 2, 0.109375),  # two-sided: symmetric
        (0, 6, 2 / 2**6),  # 0.03125
        (5, 5, 1.0),  # capped at 1
        (0, 0, 1.0),  # no discordant items: no evidence
        (1, 0, 1.0),
    ],
)
def test_mcnemar_exact_matches_the_binomial_tail(only_a, only_b, p):
    assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_is_significant_only_for_lopsided_discordance():
    assert stats.mcnemar_exact(1, 12) < 0.01  # 2 * 14 / 8192 = 0.0034
    assert stats.mcnemar_exact(40, 60) > 0.05  # p = 0.057 at 100 discordant items
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)


def test_paired_diff_interval_matches_agresti_min_by_hand():
    # n = 50 paired items, 2 right only at A, 8 only at B: diff = 6/50. Agresti-Min adds 1/2
    # to each cell: b = 2.5, c = 8.5, n' = 52; centre 6/52, half-width
    # 1.96 * sqrt(11 - 36/52) / 52 = 0.12101.
    diff, low, high = stats.paired_diff_interval(2, 8, 50)
    assert diff == pytest.approx(0.12)
    assert low == pytest.approx(6 / 52 - 0.121011, abs=1e-5)
    assert high == pytest.approx(6 / 52 + 0.121011, abs=1e-5)
    diff, low, high = stats.paired_diff_interval(8, 2, 50)  # mirrored
    assert (diff, low, high) == pytest.approx(
        (-0.12, -6 / 52 - 0.121011, -6 / 52 + 0.121011), abs=1e-5
    )
    diff, low, high = stats.paired_diff_interval(0, 0, 10)  # identical answers: centred on 0
    assert diff == 0 and low == pytest.approx(-high) and 0 < high < 0.2
    with pytest.raises(ValueError):
        stats.paired_diff_interval(6, 6, 10)


def test_weighted_mean_interval_by_hand():
    # 0.5 * 3/10 + 0.5 * 0/20 = 0.15. Agresti-Coull cells: p1 = (3 + 1.92) / 13.84,
    # p2 = 1.92 / 23.84; var = 0.25 * (p1 (1 - p1) / 13.84 + p2 (1 - p2) / 23.84).
    z = stats.Z95
    p1, p2 = (3 + z * z / 2) / (10 + z * z), (z * z / 2) / (20 + z * z)
    half = z * math.sqrt(0.25 * (p1 * (1 - p1) / (10 + z * z) + p2 * (1 - p2) / (20 + z * z)))
    low, high = stats.weighted_mean_interval([(0.5, 3, 10), (0.5, 0, 20)])
    assert (low, high) == pytest.approx((0.15 - half, 0.15 + half))
    low, high = stats.mean_interval([(0, 4)] * 9)
    assert low == 0.0 and 0.0 < high < 0.2  # all-zero tasks do not collapse to a point
    assert stats.mean_interval([]) == (0.0, 1.0)


def test_families_count_equally_in_the_headline():
    weights = family_weights(["var_assign_d0_math", "var_assign_d1_math", "copy_words"])
    assert weights == {"var_assign_d0_math": 0.25, "var_assign_d1_math": 0.25, "copy_words": 0.5}


def outcome(task: str, item: int, loops: int, output: str, gold: str) -> Outcome:
    from loopserve.benchmarks.tasks import parse_answer, score

    answer = parse_answer(task, output)
    return Outcome(task, item, loops, output, answer, gold, score(output, gold), 10, 2, 1)


def test_summary_rows_and_paired_tests_on_known_outcomes():
    examples = [Example("preschool_math", f"{i}+0=", str(i)) for i in range(4)]
    outputs = {1: ["0", "x", "2", "9"], 2: ["0", "1", "5", "3"]}  # k=1: 2 right, 1 format miss
    outcomes = [
        outcome("preschool_math", i, k, outputs[k][i], str(i)) for k in (1, 2) for i in range(4)
    ]
    flops = FlopsModel(ModelShape(576, 9, 3, 64, 1536, 49152), LoopPlan.for_model(30, max_loops=2))
    rows, families = summarize(outcomes, examples, flops)
    by = {(r["task"], r["loops"]): r for r in rows}
    k1 = by["preschool_math", 1]
    assert (k1["correct"], k1["accuracy"], k1["format_ok_rate"]) == (2, 0.5, 0.75)
    assert k1["guess_baseline"] == 0.1 and k1["family"] == "arith"
    assert by["preschool_math", 2]["accuracy"] == 0.75
    assert by["mean", 2]["accuracy"] == 0.75 and len(families) == 2
    assert by["preschool_math", 2]["flops_per_token"] > k1["flops_per_token"]
    [pair] = paired_tests(outcomes, [1, 2])
    # item 1 right only at k=2, item 2 right only at k=1: one discordant item each way
    assert (pair["only_a"], pair["only_b"], pair["diff"], pair["p_value"]) == (1, 2, 0.25, 1.0)


def test_pareto_front_keeps_only_undominated_points():
    points = [
        {"flops_per_token": 1, "accuracy": 0.3},
        {"flops_per_token": 2, "accuracy": 0.2},  # dominated by the first
        {"flops_per_token": 2, "accuracy": 0.5},
        {"flops_per_token": 3, "accuracy": 0.5},  # same accuracy, more FLOPs
        {"flops_per_token": 4, "accuracy": 0.6},
        {"flops_per_token": 4, "accuracy": 0.6},  # a tie stays on the front
    ]
    assert pareto_front(points) == [points[0], points[2], points[4], points[5]]
