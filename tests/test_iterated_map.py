"""The iterated-map task and the `iterate` task family built on it (pure, no model)."""

from __future__ import annotations

import pytest

from loopserve.benchmarks import iterated_map
from loopserve.benchmarks.cli import default_tasks, task_list
from loopserve.benchmarks.tasks import (
    ITERATE_TASKS,
    TASKS,
    Example,
    family,
    generate,
    guess_baseline,
    parse_answer,
    score,
    solve,
)


def test_permutation_is_one_cycle_fixed_by_its_seed():
    """A fixed point or a short cycle would let a model answer some items without iterating."""
    f = iterated_map.permutation()
    assert f == iterated_map.permutation(iterated_map.TASK_SEED)
    assert f != iterated_map.permutation(iterated_map.TASK_SEED + 1)
    orbit = [iterated_map.iterate(f, 0, n) for n in range(16)]
    assert sorted(orbit) == list(range(16))


def test_prompt_layout_is_the_issues():
    f = iterated_map.permutation()
    assert iterated_map.prompt(3, 2) == "S3 > > ="
    assert iterated_map.prompt(3, 0) == "S3 ="
    assert iterated_map.answer(f, 3, 2) == f"S{f[f[3]]}"


@pytest.mark.parametrize("task", ITERATE_TASKS)
def test_items_are_distinct_complete_and_seeded(task):
    """Each (start, steps) item once, however many are asked for; the seed only reorders."""
    low, high = map(int, task.removeprefix("iterate_n").split("_"))
    items = generate(task, 500, seed=1)
    assert len(items) == 16 * (high - low + 1) == len({e.prompt for e in items})
    assert {e.prompt.count(">") for e in items} == set(range(low, high + 1))
    assert items != generate(task, 500, seed=2)
    assert sorted(items, key=repr) == sorted(generate(task, 500, seed=2), key=repr)
    assert generate(task, 5, seed=1) == items[:5]


def test_solver_rederives_answers_from_the_text():
    for task in ITERATE_TASKS:
        for example in generate(task, 100):
            assert solve(task, example.prompt) == example.answer
    for bad in ("S3 > >", "S3 x =", "X3 > =", "="):
        with pytest.raises(ValueError):
            solve("iterate_n0_3", bad)


def test_scoring_baseline_and_family():
    """`S1` must not accept `S15` (one symbol's name is a prefix of another's)."""
    assert score(" S1", "S1") and not score(" S15", "S1")
    assert parse_answer("iterate_n4_7", " S15 S3") == "S15"
    assert parse_answer("iterate_n4_7", " >") is None
    assert guess_baseline(Example("iterate_n4_7", "S3 > > > > =", "S0")) == 1 / 16
    assert family("iterate_n8_10") == "iterate"


def test_bench_tasks_default_to_iterate_for_the_reference_only():
    """The text suite's prompts are all `<unk>` to the reference model, and vice versa."""
    assert default_tasks("looped-reference") == list(ITERATE_TASKS)
    assert task_list("iterate") == list(ITERATE_TASKS)
    assert task_list("all") == list(TASKS)
    assert not set(TASKS) & set(ITERATE_TASKS)
