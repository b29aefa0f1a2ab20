"""Start-up refusals and admission wiring of the looped architectures, in vLLM's config.

`EngineArgs.create_engine_config` runs vLLM's config hooks (ours included) without
starting an engine, so these run in seconds.
"""

from __future__ import annotations

import pytest


def engine_config(model_path: str, loop_block: tuple[int, int] | None = None, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    config = EngineConfig(model=model_path, dtype="float32", loop_block=loop_block)
    kwargs, _ = vllm_engine_kwargs(config)
    return EngineArgs(**{**kwargs, "max_model_len": 512, **overrides}).create_engine_config()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"enable_lora": True}, "LoRA adapters"),
        (
            {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
            "speculative decoding",
        ),
        ({"enable_dbo": True}, "dual-batch overlap"),
        ({"runner": "pooling"}, "a pooling runner"),
        ({"kv_offloading_size": 1.0}, "KV connectors and KV offloading"),
        ({"disable_hybrid_kv_cache_manager": True}, "--disable-hybrid-kv-cache-manager puts"),
        (
            {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
            "KV connectors and KV offloading",
        ),
    ],
)
def test_features_wrong_on_subset_passes_are_refused(model_path, overrides, message):
    with pytest.raises(Exception, match=f"loopserve: {message}"):
        engine_config(model_path, **overrides)


def test_a_block_across_pipeline_stages_is_refused(model_path):
    """Breakage caught: a block split over two stages (neither could run its passes).

    The default model's 30 layers split 0:15 and 15:30; the default block is 13:17.
    """
    message = "loop block 13:17 straddles a pipeline-stage boundary .stages 0:15, 15:30"
    with pytest.raises(Exception, match=message):
        engine_config(model_path, pipeline_parallel_size=2)
    for block in ((1, 5), (15, 30)):
        config = engine_config(model_path, block, pipeline_parallel_size=2)
        assert config.parallel_config.pipeline_parallel_size == 2


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


def test_a_runner_forced_to_v2_is_refused(model_path, monkeypatch):
    """Breakage caught: a looped model on the V2 runner, where the step hook never runs."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(Exception, match="loopserve: the looped model needs vLLM's V1 model runner"):
        engine_config(model_path)


RENAMED_RUNNER_FIELD = """
import sys
from vllm.v1.worker.gpu_input_batch import InputBatch
# What a vLLM release that renamed a field the step hook reads looks like.
InputBatch.request_ids = InputBatch.req_ids
del InputBatch.req_ids
from vllm import LLM
from loopserve.server.engine import EngineConfig, vllm_engine_kwargs
config = EngineConfig(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True)
LLM(**vllm_engine_kwargs(config)[0])
print("ENGINE STARTED")
"""


def test_a_runner_without_a_field_the_step_hook_reads_refuses_to_start(tiny_checkpoint):
    """Breakage caught: a vLLM that renamed what the per-step hook reads, found only when
    the first real request kills the engine. Start-up reads it through the same code."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the worker in this process
    result = subprocess.run(
        [sys.executable, "-c", RENAMED_RUNNER_FIELD, str(tiny_checkpoint("LlamaForCausalLM"))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode != 0
    assert "ENGINE STARTED" not in result.stdout
    assert "loopserve's step hook does not fit vLLM" in result.stderr
    assert "req_ids" in result.stderr
