"""Shared fixtures: the real default model, started once per test run."""

from __future__ import annotations

import contextlib
import os
import tempfile

# vLLM writes compile caches under ~/.cache/vllm and sizes its CPU KV cache from this;
# both must be set before vLLM is imported anywhere in the test process.
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="loopserve-vllm-cache-"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# LLM.apply_model ships a test function to the worker; vLLM pickles it only with this set.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    from loopserve.server.default_model import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def reference(model_path):
    from loopserve.server.loop_plan import LoopPlan
    from loopserve.server.reference import UnrolledReference

    return UnrolledReference(model_path, LoopPlan.for_model(30))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, model_path):
    """`tiny_checkpoint(architecture)`: a tiny random checkpoint, made once per run."""
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return lambda architecture: make_tiny_checkpoint(architecture, root, model_path)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def start_llm(model_path: str, **config):
    """A vLLM `LLM` on the looped model (the offline API, same plugin and hooks)."""
    from vllm import LLM

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    config = {"dtype": "float32", "max_model_len": 1024, **config}
    kwargs, _ = vllm_engine_kwargs(EngineConfig(model=model_path, **config))
    return LLM(**kwargs)


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def segment_graphs(model) -> int:
    """Graphs Dynamo compiled for loopserve's segments (prelude, block passes, coda).

    Runs in the worker (`LLM.apply_model`).
    """
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    from loopserve.server.loop_segments import CompiledSegment

    return sum(
        len(_debug_get_cache_entry_list(segment.code))
        for segment in model._segments
        if isinstance(segment, CompiledSegment)
    )


@contextlib.contextmanager
def one_core_per_rank():
    """vLLM's CPU workers bind to core 0 by default; two ranks get a core each."""
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
