"""Start-up refusals and admission wiring of the looped architectures, in vLLM's config.

`EngineArgs.create_engine_config` runs vLLM's config hooks (ours included) without
starting an engine, so these run in seconds.
"""

from __future__ import annotations

import pytest


def engine_config(model_path: str, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    kwargs, _ = vllm_engine_kwargs(EngineConfig(model=model_path, dtype="float32"))
    return EngineArgs(**{**kwargs, "max_model_len": 512, **overrides}).create_engine_config()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"enable_lora": True}, "LoRA adapters"),
        (
            {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
            "speculative decoding",
        ),
        ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ],
)
def test_features_wrong_on_subset_passes_are_refused(model_path, overrides, message):
    with pytest.raises(Exception, match=f"loopserve: {message}"):
        engine_config(model_path, **overrides)


def test_looped_engine_gets_the_admission_check(model_path):
    """The config hook adds the validator for this plan, and vLLM can load it by name."""
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns

    config = engine_config(model_path)
    [name] = config.model_config.logits_processors
    [validator] = _load_logitsprocs_by_fqcns([name])
    assert validator.plan.max_loops == 4
    validator.validate_params(_params({"loops": 4}))
    with pytest.raises(ValueError, match="max_loops=4, got 5"):
        validator.validate_params(_params({"loops": 5}))


def _params(extra_args):
    from vllm import SamplingParams

    return SamplingParams(extra_args=extra_args)
