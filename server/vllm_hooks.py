"""The engine half of loopserve's vLLM hooks; loaded in every vLLM process as a plugin.

Together with `vllm_http_hooks` (the API server's half), the only code that touches
vLLM internals.

vLLM has no public way to hand a model per-request data at each step, nor to keep
prefix-cache entries of different depths apart, so loopserve hooks a few private places.
Each is checked against the vLLM release it was written for: on another release this
module fails at import with a message naming what to check, rather than run silently
wrong.

1. Config (`MODELS_CONFIG_MAP`): for a looped architecture refuse, at start-up, what the
   looped block cannot serve exactly (`_refused_features`), keep the V1 model runner (the
   hook in 2 lives there) and add the admission check of loop counts (`loop_admission`,
   a logits-processor validator) to the engine.
2. Model runner (`GPUModelRunner._model_forward`, `_dummy_run`; the CPU runner inherits
   them): publish per-token loop counts for the step, from each request's
   `SamplingParams.extra_args["loops"]`; dummy runs (warm-up, compilation, profiling)
   use k=1, the path vLLM compiles, then once at the deepest k, which compiles
   loopserve's segments at start-up. Once the KV cache is set up
   (`initialize_kv_cache`), the hook reads the empty batch's loop counts the way a real
   step does, so a vLLM whose runner renamed what that reads refuses to start. A looped
   step replays no CUDA graph (the captured ones hold k=1's layer order).
3. Engine core (`EngineCore.preprocess_add_request`): every request's prefix-cache salt
   leads with the plan and its resolved depth (`loop_cache_salt`), so KV computed at one
   depth or under one plan is never reused at another; the request's depth is recorded
   for the KV managers of the pass groups (`pass_kv.request_depths`).
4. KV by depth (`pass_kv`): vLLM's KV-cache spec registry (`KVCacheSpecRegistry`)
   gets the pass planes' spec and its manager, which subclasses vLLM's
   `FullAttentionManager` and overrides how many blocks a request needs, allocation
   and prefix lookup; `KVCacheManager.get_computed_blocks` is wrapped so the lookup
   knows whose prefix it looks up. Once the KV cache is laid out (`initialize_kv_cache`)
   a layout where passes share groups is refused, the capacity per depth logged, and
   each pass group's `AttentionGroup.build_metadata` wrapped so that its attention
   metadata describes only the requests that run the pass (`_requests_subset` narrows
   vLLM's `CommonAttentionMetadata`); the step hook (2) narrows the planes' slot
   mappings in the forward context to the same rows.
5. Registry: `ModelRegistry.register_model` (public) for `Looped<Arch>` of every
   supported architecture; `vllm_model_class` finds vLLM's own class for `<Arch>`.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from typing import Any

import numpy as np
import torch
import vllm

from loopserve.server.loop_context import active_loop_context, looping
from loopserve.server.loop_plan import (
    LOOPED_PREFIX,
    SUPPORTED_ARCHITECTURES,
    LoopPlan,
    loop_cache_salt,
    looped_architecture,
    plan_from_hf_config,
)

SUPPORTED_VLLM = "0.32."
MODEL_MODULE = "loopserve.server.looped_model"

# Under vLLM's logger, so the messages show where vLLM's do.
logger = logging.getLogger("vllm.loopserve")

if not vllm.__version__.startswith(SUPPORTED_VLLM):
    raise ImportError(
        f"loopserve's vLLM hooks were written for vLLM {SUPPORTED_VLLM}x, found "
        f"{vllm.__version__}; check vllm_hooks.py against the new release before use"
    )

from vllm.config import CUDAGraphMode  # noqa: E402
from vllm.distributed.utils import get_pp_indices  # noqa: E402
from vllm.forward_context import ForwardContext, get_forward_context  # noqa: E402
from vllm.model_executor.models import ModelRegistry  # noqa: E402
from vllm.model_executor.models.config import (  # noqa: E402
    MODELS_CONFIG_MAP,
    VerifyAndUpdateConfig,
)
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager  # noqa: E402
from vllm.v1.engine.core import EngineCore  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402
from vllm.v1.worker.gpu_input_batch import CachedRequestState  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402
from vllm.v1.worker.utils import AttentionGroup  # noqa: E402

from loopserve.server import pass_kv  # noqa: E402

# The per-batch attention metadata a pass's sub-batch narrows (`_requests_subset`),
# and what it does not narrow: none of that is set for the looped (text,
# decoder-only) families.
_NARROWED_FIELDS = (
    "query_start_loc_cpu",
    "seq_lens_cpu_upper_bound",
    "block_table_tensor",
    "slot_mapping",
    "positions",
    "is_prefilling",
    "req_idx",
)
_UNNARROWED_FIELDS = (
    "logits_indices_padded",
    "encoder_seq_lens",
    "dcp_local_seq_lens",
    "mm_req_doc_ranges",
    "rswa_prefix_lens",
    "replayssm_decode_base_cpu",
)
for _owner, _name in (
    (GPUModelRunner, "_model_forward"),
    (GPUModelRunner, "_dummy_run"),
    (GPUModelRunner, "initialize_kv_cache"),
    (GPUModelRunner, "get_model"),
    (EngineCore, "preprocess_add_request"),
    (ModelRegistry, "_try_load_model_cls"),
    (KVCacheManager, "get_computed_blocks"),
    (AttentionGroup, "build_metadata"),
    (KVCacheSpecRegistry, "_ensure_registered"),
    (KVCacheSpecRegistry, "register"),
    (SingleTypeKVCacheManager, "get_num_blocks_to_allocate"),
    (SingleTypeKVCacheManager, "allocate_new_blocks"),
    (SingleTypeKVCacheManager, "find_longest_cache_hit"),
):
    if not hasattr(_owner, _name):
        raise ImportError(
            f"vLLM {vllm.__version__} has no {_owner.__name__}.{_name}: loopserve's hooks "
            "do not fit this release"
        )
for _owner, _field in (
    (ForwardContext, "cudagraph_runtime_mode"),
    (ForwardContext, "slot_mapping"),
    *((CommonAttentionMetadata, name) for name in (*_NARROWED_FIELDS, *_UNNARROWED_FIELDS)),
    (AttentionGroup, "metadata_builders"),
    (CachedRequestState, "sampling_params"),
    (SamplingParams, "extra_args"),
):
    # vLLM's records are dataclasses or msgspec structs.
    if _field not in {
        *getattr(_owner, "__dataclass_fields__", ()),
        *getattr(_owner, "__struct_fields__", ()),
    }:
        raise ImportError(f"vLLM {vllm.__version__}'s {_owner.__name__} has no {_field}")


def vllm_model_class(architecture: str) -> type:
    """vLLM's own model class for `architecture`, as its registry resolves it."""
    cls = ModelRegistry._try_load_model_cls(architecture)
    if cls is None:
        raise ValueError(f"vLLM {vllm.__version__} has no model class for {architecture}")
    return cls


def attention_layer(layer_name: str) -> Any:
    """The attention module bound under `layer_name` in the running forward.

    How vLLM's own attention ops find their layer; loopserve's pass attention op does
    the same for its planes.
    """
    return get_forward_context().no_compile_layers[layer_name]


def attention_under_name(base: Any, name: str, vllm_config: Any) -> Any:
    """A copy of an `Attention` that vLLM binds its own KV cache to, under `name`.

    The copy shares the original's implementation, settings (heads, scale, sliding
    window, softcap, alibi) and parameters (quantization and KV-cache scales); vLLM
    finds attention layers by name in the compilation config's static forward context.
    """
    static_context = vllm_config.compilation_config.static_forward_context
    if name in static_context:
        raise ValueError(f"duplicate attention layer name {name!r}")
    plane = copy.copy(base)
    plane._parameters = dict(base._parameters)
    plane._buffers = dict(base._buffers)
    plane._modules = dict(base._modules)
    plane.layer_name = name
    plane.kv_cache = torch.tensor([])
    static_context[name] = plane
    return plane


def decoder_stage(decoder: Any) -> tuple[list[Any], int, int]:
    """The decoder's layer list and this pipeline stage's span of it (vLLM's
    `make_layers` leaves placeholders outside the span)."""
    return list(decoder.layers), decoder.start_layer, decoder.end_layer


def decoder_with_layers(decoder: Any, layers: list[Any]) -> Any:
    """A second instance of the decoder's class sharing all its state but `layers`.

    An instance of the class itself, so a family's forward that calls
    `super().forward` (Mistral's) runs as it does on the decoder.
    """
    view = object.__new__(type(decoder))
    view.__dict__.update(decoder.__dict__)
    view.__dict__["_modules"] = {**decoder._modules, "layers": layers}
    return view


# What the looped model reads on vLLM's modules: the decoder (`decoder_stage`), each
# block layer's `Attention` (`attention_under_name`, the pass attention's output shape)
# and its entry norm (the fused hand-over).
_MODEL_SURFACE = {
    "decoder": ("layers", "start_layer", "end_layer", "forward"),
    "Attention": ("layer_name", "kv_cache", "num_heads", "head_size_v", "_parameters"),
    "RMSNorm": ("weight", "variance_epsilon", "has_weight", "variance_size_override"),
}


def check_model_surface(decoder: Any, block: list[Any]) -> None:
    """Refuse, at model construction, a vLLM whose modules lack what loopserve reads."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.layernorm import RMSNorm

    found = {"decoder": [decoder]}
    for layer in block:
        for module in layer.modules():
            for kind, cls in (("Attention", Attention), ("RMSNorm", RMSNorm)):
                if type(module) is cls:
                    found.setdefault(kind, []).append(module)
    for kind, names in _MODEL_SURFACE.items():
        for module in found.get(kind, []):
            missing = [name for name in names if not hasattr(module, name)]
            if missing:
                raise RuntimeError(
                    f"vLLM {vllm.__version__}'s {type(module).__name__} has no "
                    f"{', '.join(missing)}: loopserve's model hooks do not fit this release"
                )


def _refused_features(vllm_config: Any) -> dict[str, bool]:
    """What a looped model cannot serve exactly, each with whether this config asks for it."""
    cache_config = vllm_config.cache_config
    return {
        "LoRA adapters (a subset pass would apply the adapters of other rows)": (
            vllm_config.lora_config is not None
        ),
        "speculative decoding (draft and target would disagree on depth)": (
            vllm_config.speculative_config is not None
        ),
        "dual-batch overlap (--enable-dbo: its micro-batches carry no loop counts)": (
            vllm_config.parallel_config.enable_dbo
        ),
        "a pooling runner (embedding, scoring: looping is for generation)": (
            vllm_config.model_config.runner_type == "pooling"
        ),
        "KV connectors and KV offloading (they store and reload KV by token hashes that "
        "know nothing of depth or loop plan)": (
            vllm_config.kv_transfer_config is not None
            or getattr(cache_config, "kv_offloading_size", None) is not None
        ),
    }


def _check_block_inside_one_stage(plan: LoopPlan, num_stages: int) -> None:
    """Refuse a block across a pipeline-stage boundary: one stage must run all its passes.

    The stages are vLLM's own split of the layers (`get_pp_indices`, which follows
    `VLLM_PP_LAYER_PARTITION`), the one every worker builds its layers from.
    """
    stages = [get_pp_indices(plan.num_layers, rank, num_stages) for rank in range(num_stages)]
    if any(first <= plan.start and plan.end <= last for first, last in stages):
        return
    spans = ", ".join(f"{first}:{last}" for first, last in stages)
    raise ValueError(
        f"loopserve: loop block {plan.start}:{plan.end} straddles a pipeline-stage boundary "
        f"(stages {spans} with --pipeline-parallel-size {num_stages}); choose a block inside "
        f"one stage (any START:END within one of {spans}) or set VLLM_PP_LAYER_PARTITION"
    )


class LoopedModelConfig(VerifyAndUpdateConfig):
    """Config hook vLLM calls while building the VllmConfig of a looped architecture."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from loopserve.server.loop_admission import validator_for

        for what, present in _refused_features(vllm_config).items():
            if present:
                raise ValueError(f"loopserve: {what} is not supported with a looped model")
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "") in ("1", "true", "True"):
            raise ValueError(
                "loopserve: the looped model needs vLLM's V1 model runner; "
                "unset VLLM_USE_V2_MODEL_RUNNER"
            )
        if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
            logger.info("loopserve: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if vllm_config.use_v2_model_runner:
            raise ValueError(
                "loopserve: the looped model needs vLLM's V1 model runner, and a feature of "
                "this configuration (HiSparse attention or watermarking) forces V2"
            )
        if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
            raise ValueError(
                "loopserve: --disable-hybrid-kv-cache-manager puts every pass's KV in one "
                "group, so every request would hold KV for the deepest depth; a looped "
                "model needs vLLM's hybrid KV-cache manager"
            )
        model_config = vllm_config.model_config
        plan = plan_from_hf_config(model_config.hf_config)
        _check_block_inside_one_stage(plan, vllm_config.parallel_config.pipeline_parallel_size)
        validator = validator_for(plan)
        processors = list(model_config.logits_processors or [])
        if validator not in processors:
            model_config.logits_processors = [*processors, validator]


def looped_plan(model_config: Any) -> LoopPlan | None:
    """The loop plan of the model an engine serves; None for a stock model."""
    architectures = getattr(model_config, "architectures", None) or [""]
    if not architectures[0].startswith(LOOPED_PREFIX):
        return None
    return plan_from_hf_config(model_config.hf_config)


def _looped_model(runner: Any) -> Any | None:
    model = runner.get_model()
    return model if hasattr(model, "looped_decoder") and hasattr(model, "loop_plan") else None


def _step_request_loops(runner: Any, plan: LoopPlan) -> np.ndarray:
    """Loop count of each scheduled request, in the batch's order."""
    try:
        num_reqs = runner.input_batch.num_reqs
        return np.array(
            [
                plan.loops_of(runner.requests[req_id].sampling_params.extra_args)
                for req_id in runner.input_batch.req_ids[:num_reqs]
            ],
            dtype=np.int64,
        )
    except AttributeError as error:
        raise RuntimeError(
            f"loopserve's step hook does not fit vLLM {vllm.__version__}'s model runner: "
            f"{error}; check vllm_hooks._step_request_loops against this release"
        ) from error


def _step_token_loops(runner: Any, plan: LoopPlan, num_tokens: int) -> np.ndarray:
    """Per-token loop counts of the scheduled batch, padding rows at 1."""
    per_request = _step_request_loops(runner, plan)
    counts = np.diff(runner.query_start_loc.np[: len(per_request) + 1])
    token_loops = np.ones(num_tokens, dtype=np.int64)
    token_loops[: int(counts.sum())] = np.repeat(per_request, counts)
    return token_loops


def _requests_subset(common: CommonAttentionMetadata, requests: np.ndarray) -> Any:
    """vLLM's per-batch attention metadata narrowed to `requests` (indices, in order)
    and their tokens: what a pass run by those requests alone attends over."""
    unsupported = [name for name in _UNNARROWED_FIELDS if getattr(common, name) is not None]
    if unsupported or not isinstance(common.causal, bool):
        raise RuntimeError(
            f"loopserve cannot narrow attention metadata carrying {unsupported or 'causal'}"
        )
    starts = common.query_start_loc_cpu.numpy()
    query_lens = np.diff(starts)[requests]
    tokens = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in requests])
    sub_starts = torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32))
    device = common.seq_lens.device
    on_device = torch.from_numpy(requests).to(device)
    token_index = torch.from_numpy(tokens).to(device)
    bound = common.seq_lens_cpu_upper_bound
    return common.replace(
        query_start_loc=sub_starts.to(device),
        query_start_loc_cpu=sub_starts,
        seq_lens=common.seq_lens[on_device],
        seq_lens_cpu_upper_bound=None if bound is None else bound[torch.from_numpy(requests)],
        num_reqs=len(requests),
        num_actual_tokens=len(tokens),
        max_query_len=int(query_lens.max()),
        block_table_tensor=common.block_table_tensor[on_device],
        slot_mapping=common.slot_mapping[token_index],
        positions=None if common.positions is None else common.positions[token_index],
        is_prefilling=(
            None if common.is_prefilling is None else common.is_prefilling[on_device.cpu()]
        ),
        req_idx=None if common.req_idx is None else common.req_idx[requests],
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )


def _narrowed_to_pass(runner: Any, plan: LoopPlan, loop_pass: int, build: Any) -> Any:
    """A pass group's `AttentionGroup.build_metadata` that describes only the requests
    that run that pass, when some do not."""

    @functools.wraps(build)
    def build_metadata(common: Any, *args: Any, **kwargs: Any) -> Any:
        # Dummy runs (inside `looping`) run every row the same number of passes.
        if active_loop_context() is None:
            deep = np.flatnonzero(_step_request_loops(runner, plan) >= loop_pass)
            if 0 < len(deep) < common.num_reqs:
                common = _requests_subset(common, deep)
        return build(common, *args, **kwargs)

    return build_metadata


def _narrow_pass_slots(model: Any, token_loops: np.ndarray, device: torch.device) -> None:
    """Point each pass's planes at the slots of the rows that run that pass, so K/V
    are written for those rows only (the step's forward context holds one slot mapping
    per layer name, rebuilt every step; a group's layers share one)."""
    slots = get_forward_context().slot_mapping
    rows_of: dict[int, torch.Tensor | None] = {}
    narrowed: dict[int, torch.Tensor] = {}
    for name, loop_pass in model.pass_planes.items():
        if loop_pass not in rows_of:
            rows = np.flatnonzero(token_loops >= loop_pass)
            whole = len(rows) in (0, len(token_loops))
            rows_of[loop_pass] = None if whole else torch.from_numpy(rows).to(device)
        index = rows_of[loop_pass]
        if index is not None:
            full = slots[name]
            if id(full) not in narrowed:
                narrowed[id(full)] = full.index_select(0, index)
            slots[name] = narrowed[id(full)]


def _wrap_model_forward(original):
    @functools.wraps(original)
    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        model = _looped_model(self)
        if model is None:
            return original(self, input_ids, positions, *args, **kwargs)
        token_loops = _step_token_loops(self, model.loop_plan, positions.shape[-1])
        with looping(token_loops):
            if token_loops.max(initial=1) > 1:
                # A captured CUDA graph would replay the k=1 forward it captured.
                get_forward_context().cudagraph_runtime_mode = CUDAGraphMode.NONE
                if model.holds_block:
                    _narrow_pass_slots(model, token_loops, positions.device)
            return original(self, input_ids, positions, *args, **kwargs)

    return _model_forward


def _wrap_initialize_kv_cache(original):
    @functools.wraps(original)
    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        result = original(self, kv_cache_config, *args, **kwargs)
        model = _looped_model(self)
        if model is not None:
            # Once at start-up, with the batch as steps will see it: reading its (empty)
            # loop counts as a real step does makes a runner that no longer fits refuse
            # to start instead of failing the first request.
            _step_token_loops(self, model.loop_plan, 0)
            if model.holds_block:
                _set_up_pass_groups(self, model, kv_cache_config)
        return result

    return initialize_kv_cache


def _set_up_pass_groups(runner: Any, model: Any, kv_cache_config: Any) -> None:
    """Refuse a layout where passes share KV groups; make each pass group's attention
    metadata describe the requests that run the pass; log what the pool holds per depth."""
    groups = kv_cache_config.kv_cache_groups
    group_passes = pass_kv.check_groups(groups, model.pass_planes)
    plan = model.loop_plan
    for group_id, loop_pass in enumerate(group_passes):
        if loop_pass == 1:
            continue
        for attention_group in runner.attn_groups[group_id]:
            if group_passes.count(loop_pass) > 1 and any(
                builder.supports_update_block_table for builder in attention_group.metadata_builders
            ):
                # vLLM would reuse one group's metadata for the next with the full
                # batch's block table.
                raise RuntimeError(
                    f"loopserve: pass {loop_pass}'s planes span "
                    f"{group_passes.count(loop_pass)} KV-cache groups under an attention "
                    "backend that shares metadata across groups; choose a smaller block"
                )
            attention_group.build_metadata = _narrowed_to_pass(
                runner, plan, loop_pass, attention_group.build_metadata
            )
    tokens = pass_kv.tokens_per_depth(
        kv_cache_config.num_blocks, groups[0].kv_cache_spec.block_size, group_passes, plan.max_loops
    )
    logger.info(
        "loopserve: the KV pool holds, in tokens, %s (loops=1: %d KV-cache groups; each "
        "pass above 1: %d more)",
        ", ".join(f"{count} at loops={k}" for k, count in tokens.items()),
        group_passes.count(1),
        group_passes.count(2),
    )


def _wrap_dummy_run(original):
    @functools.wraps(original)
    def _dummy_run(self, num_tokens, *args, **kwargs):
        model = _looped_model(self)
        if model is None:
            return original(self, num_tokens, *args, **kwargs)
        # k=1 for every token, whatever padding vLLM adds: the path vLLM warms up,
        # compiles and captures is the one k=1 steps take.
        with looping(1):
            out = original(self, num_tokens, *args, **kwargs)
        if num_tokens >= 2 and model.take_warm_up():
            # Once more at the deepest loop count, so loopserve's segments compile (or
            # load from vLLM's compile cache) now rather than at the first looped request.
            with looping(model.loop_plan.max_loops):
                original(self, num_tokens, *args, **kwargs)
        return out

    return _dummy_run


def _wrap_preprocess_add_request(original):
    @functools.wraps(original)
    def preprocess_add_request(self, request):
        plan = looped_plan(self.vllm_config.model_config)
        if plan is None:
            return original(self, request)
        params = request.sampling_params
        loops = plan.loops_of(params.extra_args if params is not None else None)
        request.cache_salt = loop_cache_salt(plan, loops, request.cache_salt)
        result = original(self, request)
        pass_kv.request_depths.add(result[0], loops)
        return result

    return preprocess_add_request


def _wrap_get_computed_blocks(original):
    @functools.wraps(original)
    def get_computed_blocks(self, request):
        with pass_kv.request_depths.looking_up(request.request_id):
            return original(self, request)

    return get_computed_blocks


_installed = False


def register() -> None:
    """vLLM plugin entry point (`vllm.general_plugins`): idempotent, runs in every process."""
    global _installed
    if _installed:
        return

    for architecture in SUPPORTED_ARCHITECTURES:
        looped = looped_architecture(architecture)
        ModelRegistry.register_model(looped, f"{MODEL_MODULE}:{looped}")
        MODELS_CONFIG_MAP[looped] = LoopedModelConfig
    GPUModelRunner._model_forward = _wrap_model_forward(GPUModelRunner._model_forward)
    GPUModelRunner._dummy_run = _wrap_dummy_run(GPUModelRunner._dummy_run)
    GPUModelRunner.initialize_kv_cache = _wrap_initialize_kv_cache(
        GPUModelRunner.initialize_kv_cache
    )
    EngineCore.preprocess_add_request = _wrap_preprocess_add_request(
        EngineCore.preprocess_add_request
    )
    KVCacheManager.get_computed_blocks = _wrap_get_computed_blocks(
        KVCacheManager.get_computed_blocks
    )
    # vLLM registers its own specs on first use, only while the registry is empty:
    # register them first, then the pass planes' spec.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        pass_kv.PassAttentionSpec,
        pass_kv.PassKVManager,
        uniform_type_base_spec=pass_kv.PassAttentionSpec,
    )
    _installed = True
