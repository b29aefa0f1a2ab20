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


# The shared server's options (`shared_server`), which its tests read back.
SERVER_API_KEY = "test-key-123"
SERVER_MAX_MODEL_LEN = 2048
SERVER_DEFAULT_LOOPS = 3


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, model_path):
    """One `loopserve serve` on the default model for every HTTP test module
    (test_server, test_bench, test_lm_eval). Eager: what these tests check (the HTTP
    layer, usage, salts, metrics) does not depend on compilation, which costs minutes
    per start here; test_engine runs the default model compiled, through the same hooks.

    Its options are the union of what they need: an API key (the key checks), cached-token
    counts and request-id headers, 2048 tokens (a 1041-token FLOPs check; a 3000-token
    prompt is still refused), 64 streams at once, and default depth 3 rather than 1, so a
    request that lost its `loops` on the way shows as loops="3" where a test sends 1 or 2.
    Tests that stop a server start their own.
    """
    from loopserve.server.launcher import start_server

    options = [
        *("--api-key", SERVER_API_KEY, "--max-model-len", str(SERVER_MAX_MODEL_LEN)),
        *("--default-loops", str(SERVER_DEFAULT_LOOPS), "--max-num-seqs", "64"),
        *("--enable-prompt-tokens-details", "--enable-request-id-headers", "--enforce-eager"),
    ]
    server = start_server(options, str(tmp_path_factory.mktemp("shared-server") / "server.log"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def start_llm(model_path: str, vllm_options: dict | None = None, **config):
    """A vLLM `LLM` on the looped model (the offline API, same plugin and hooks);
    `vllm_options` go to vLLM as they are."""
    from vllm import LLM

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    config = {"dtype": "float32", "max_model_len": 1024, **config}
    kwargs, _ = vllm_engine_kwargs(EngineConfig(model=model_path, **config))
    return LLM(**kwargs, **(vllm_options or {}))


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def compiled_segments(model) -> list[str]:
    """loopserve's segments that run compiled: traced at start-up or loaded from vLLM's
    compile cache (vLLM's decorator keeps one of the two). Runs in the worker
    (`LLM.apply_model`).
    """
    decoder = model._looped_decoder
    if decoder is None:
        return []
    return [
        type(segment).__name__
        for segment in decoder.segments
        if getattr(segment, "compiled", False) or getattr(segment, "aot_compiled_fn", None)
    ]


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
