"""Statistics for accuracy cells: intervals, paired tests between loop counts, means.

Every loop count answers the same items, so two loop counts are compared item by item
(a paired design): only the discordant items (right at one k, wrong at the other) carry
information, which is what McNemar's exact test and the Agresti-Min interval use. Stdlib
only, so the harness needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval: unlike the normal one it stays in [0, 1] and works at p=0, 1.

    With n = 0 nothing is known, so the interval is all of [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact 0 and 1 at the ends
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def weighted_mean_interval(
    cells: Sequence[tuple[float, int, int]], z: float = Z95
) -> tuple[float, float]:
    """95% normal interval of sum(w * p) over independent proportions given as (w, successes, n).

    Centred on the weighted mean itself; each variance uses the Agresti-Coull estimate
    (z^2/2 extra successes and failures), so cells at 0% or 100% do not collapse it to a point.
    """
    if not cells or any(n <= 0 for _, _, n in cells):
        return 0.0, 1.0
    mean = sum(w * x / n for w, x, n in cells)
    variance = 0.0
    for w, x, n in cells:
        p = (x + z * z / 2) / (n + z * z)
        variance += w * w * p * (1 - p) / (n + z * z)
    half = z * math.sqrt(variance)
    return max(0.0, mean - half), min(1.0, mean + half)


def mean_interval(counts: Sequence[tuple[int, int]], z: float = Z95) -> tuple[float, float]:
    """95% interval of the unweighted mean of independent proportions (successes, n)."""
    weight = 1 / len(counts) if counts else 0.0
    return weighted_mean_interval([(weight, x, n) for x, n in counts], z)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    `only_a` items are right at A only, `only_b` at B only. Under "no difference" each
    discordant item is a fair coin, so p = 2 * P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    total = only_a + only_b
    tail = sum(math.comb(total, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**total)


def paired_diff_interval(
    only_a: int, only_b: int, n: int, z: float = Z95
) -> tuple[float, float, float]:
    """(diff, low, high): accuracy(B) - accuracy(A) on n paired items, 95% Agresti-Min interval.

    Agresti & Min (2005): add 1/2 to each of the four cells of the paired 2x2 table, then use
    the Wald interval; it keeps near-nominal coverage where the plain Wald one fails
    (few discordant items).
    """
    if n <= 0 or only_a < 0 or only_b < 0 or only_a + only_b > n:
        raise ValueError(f"need 0 <= only_a + only_b <= n, n >= 1; got {only_a}, {only_b}, {n}")
    diff = (only_b - only_a) / n
    m = n + 2
    b, c = only_a + 0.5, only_b + 0.5
    center = (c - b) / m
    half = z * math.sqrt((b + c) - (c - b) ** 2 / m) / m
    return diff, max(-1.0, center - half), min(1.0, center + half)
