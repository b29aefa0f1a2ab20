"""The per-step loop context: published by the runner hook, read by the looped model."""

from __future__ import annotations

import numpy as np
import pytest

from loopserve.server.loop_context import MissingLoopCounts, current_loop_context, looping


def test_no_context_outside_a_step():
    """Breakage caught: a forward that silently runs k=1 when no hook published counts."""
    with pytest.raises(MissingLoopCounts, match="without per-token loop counts"):
        current_loop_context()


def test_one_count_covers_any_padded_batch():
    with looping(3) as context:
        schedule = current_loop_context().start(5, "cpu")
    assert context.schedule is schedule
    assert schedule.max_loops == 3
    assert [len(rows) for rows in schedule.pass_rows] == [5, 5, 5]


def test_per_token_counts_give_each_pass_its_rows():
    with looping(np.array([1, 3, 2, 1])):
        schedule = current_loop_context().start(4, "cpu")
    assert [rows.tolist() for rows in schedule.pass_rows] == [[0, 1, 2, 3], [1, 2], [1]]


def test_counts_for_another_batch_size_are_refused():
    with looping(np.array([1, 2])), pytest.raises(MissingLoopCounts, match="cover 2 tokens"):
        current_loop_context().start(3, "cpu")


def test_contexts_nest_and_restore():
    with looping(2) as outer:
        with looping(4) as inner:
            assert current_loop_context() is inner
        assert current_loop_context() is outer
    with pytest.raises(MissingLoopCounts):
        current_loop_context()
