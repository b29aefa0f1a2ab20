"""Loop plan validation, loop schedule construction, and the cache-salt rule."""

from __future__ import annotations

import numpy as np
import pytest

from loopserve.server.loop_plan import (
    LoopPlan,
    LoopPlanError,
    default_block,
    loop_cache_salt,
    parse_block,
)
from loopserve.server.loop_schedule import LoopSchedule


def test_default_block_is_the_middle_four():
    assert default_block(30) == (13, 17)
    assert default_block(32) == (14, 18)
    assert default_block(3) == (0, 3)


def test_executed_layers_and_depth():
    plan = LoopPlan(num_layers=6, start=2, end=4, max_loops=3)
    assert plan.executed_layers(1) == [0, 1, 2, 3, 4, 5]
    assert plan.executed_layers(3) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert plan.executed_depth(3) == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 28, "end": 40}, "0 <= start < end <= num_layers"),
        ({"start": 5, "end": 5}, "start < end"),
        ({"start": -1, "end": 3}, "0 <= start"),
        ({"max_loops": 0}, "max_loops must be >= 1"),
        ({"default_loops": 5}, "default_loops must be in [1, max_loops=4]"),
        ({"max_loops": 2.0}, "max_loops must be an integer"),
    ],
)
def test_bad_plans_fail_clearly(kwargs, message):
    fields = {"num_layers": 30, "start": 13, "end": 17, **kwargs}
    with pytest.raises(LoopPlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LoopPlan(**fields)


@pytest.mark.parametrize("value", [0, -1, 5, 2.5, "3", None, [], True])
def test_bad_loop_counts_fail_clearly(value):
    with pytest.raises(LoopPlanError, match="'loops' must be"):
        LoopPlan.for_model(30).check_loops(value)


def test_loops_of_extra_args():
    plan = LoopPlan.for_model(30, default_loops=2)
    assert plan.loops_of(None) == 2
    assert plan.loops_of({"loops": 4}) == 4
    with pytest.raises(LoopPlanError):
        plan.loops_of({"loops": 9})


def test_parse_block():
    assert parse_block("13:17") == (13, 17)
    for text in ("13", "a:b", "1:2:3", ""):
        with pytest.raises(LoopPlanError, match="START:END"):
            parse_block(text)


def test_cache_salt_is_unique_per_plan_depth_and_client_salt():
    """Breakage caught: a client salt that spells another depth's (or plan's) key.

    The reported collisions: a depth-1 request salted "loops=4" or "t1|loops=4" against a
    depth-4 request with no salt or salt "t1"; plus salts built from the folded form itself.
    """
    plans = [
        LoopPlan.for_model(30),
        LoopPlan.for_model(30, (12, 16)),
        LoopPlan.for_model(30, None, 8),
    ]
    client_salts = [None, "t1", "loops=4", "t1|loops=4", "t1@loops=4", "@", "@loops=1@t1"]
    client_salts.append(loop_cache_salt(plans[0], 1, "t1"))
    keys = [(i, k, s) for i in range(len(plans)) for k in (1, 2, 4) for s in client_salts]
    salts = {loop_cache_salt(plans[i], k, s) for i, k, s in keys}
    assert len(salts) == len(keys)


def test_schedule_rows_and_slots():
    schedule = LoopSchedule.build(np.array([1, 3, 2, 3, 1]), "cpu")
    assert schedule.max_loops == 3
    assert [r.tolist() for r in schedule.pass_rows] == [[0, 1, 2, 3, 4], [1, 2, 3], [1, 3]]
    assert schedule.full_pass == [True, False, False]
    assert [s.tolist() for s in schedule.next_slot] == [[-1, 0, 1, 2, -1], [0, -1, 1], [-1, -1]]
    assert schedule.num_next == [3, 2, 0]
    assert [k.tolist() for k in schedule.keep] == [[1, 2, 3], [0, 2], []]
    assert [d.tolist() for d in schedule.done] == [[0, 4], [1], [0, 1]]
    assert [d.tolist() for d in schedule.done_rows] == [[0, 4], [2], [1, 3]]


def test_k1_schedule_carries_no_tensors():
    """A k=1 step takes vLLM's own forward: nothing to build, whatever its token count."""
    schedule = LoopSchedule.build(np.ones(7, dtype=np.int64), "cpu")
    assert schedule.max_loops == 1
    assert schedule.pass_rows == [] and schedule.next_slot == []


def test_schedule_uniform_and_empty():
    uniform = LoopSchedule.build(np.full(4, 2), "cpu")
    assert uniform.full_pass == [True, True]
    assert LoopSchedule.build(np.zeros(0, dtype=np.int64), "cpu").max_loops == 1
    with pytest.raises(ValueError, match=">= 1"):
        LoopSchedule.build(np.array([0, 1]), "cpu")


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "OlmoeForCausalLM"])
def test_unsupported_architecture_is_refused_with_the_list(tmp_path, architecture):
    import json

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs
    from loopserve.server.loop_plan import SUPPORTED_ARCHITECTURES

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [architecture], "num_hidden_layers": 4})
    )
    with pytest.raises(LoopPlanError, match=f"{architecture}.*not supported") as error:
        vllm_engine_kwargs(EngineConfig(model=str(tmp_path)))
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)


def test_every_supported_architecture_has_a_looped_vllm_class():
    from loopserve.server import looped_model
    from loopserve.server.loop_plan import SUPPORTED_ARCHITECTURES, looped_architecture

    for architecture in SUPPORTED_ARCHITECTURES:
        cls = getattr(looped_model, looped_architecture(architecture))
        assert cls.__name__ == looped_architecture(architecture)
        assert architecture.removesuffix("ForCausalLM") in cls.__mro__[2].__name__
