"""loopserve's plugin in a Ray worker: what vLLM's Ray executor needs on every node.

vLLM loads general plugins from installed entry points in each process it starts, Ray
workers included; nothing travels from the driver. A Ray task (a fresh worker process)
loads vLLM's plugins and must find every `Looped<Arch>` registered and loadable.
vLLM 0.32's CPU platform has no Ray device key, so its Ray executor cannot start an
engine here (README, "Scaling out").
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


def _looped_classes_in_worker() -> list[str]:
    from vllm.model_executor.models import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    looped = sorted(a for a in ModelRegistry.get_supported_archs() if a.startswith("Looped"))
    return [cls.__name__ for cls in map(ModelRegistry._try_load_model_cls, looped) if cls]


def test_plugin_loads_in_a_ray_worker():
    """Breakage caught: the plugin registered only in the driver (or not installed)."""
    import sys

    from loopserve.server.loop_plan import SUPPORTED_ARCHITECTURES, looped_architecture

    # Ray workers cannot import this test module: ship the task's function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        names = ray.get(ray.remote(_looped_classes_in_worker).remote(), timeout=300)
    finally:
        ray.shutdown()
    assert names == sorted(map(looped_architecture, SUPPORTED_ARCHITECTURES))
