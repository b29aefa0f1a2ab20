"""KV by depth: each pass p >= 2 keeps its planes' KV in KV-cache groups of its own,
and only requests that run pass p hold blocks there.

Why this design: vLLM already keeps one block table per KV-cache group and one
single-type manager per group, and its KV-cache spec registry lets a spec type bring
its own manager. A spec per pass (`PassAttentionSpec`, never merged with another pass
or with the model's own layers) makes vLLM put each pass's planes in their own groups;
its manager (`PassKVManager`) allocates nothing for a request shallower than its pass.
A k=1 request then holds blocks in the model's own groups only, a k-deep one in those
and in the groups of passes 2..k; admission and preemption count exactly that, since
vLLM's scheduler asks the managers how many blocks a request needs.

A shallow request's rows in a pass group's block table are vLLM's null block, so the
table is as long as in every other group and can never point into another request's
blocks; the request writes nothing there (a pass's attention metadata and slots cover
only the requests that run it, `vllm_hooks`). Its prefix-cache lookups in that group
hit "everything" (null blocks), so the groups it does hold decide its hit.

A pass plane attends exactly as its layer does (windows, softcaps are the layer's own);
its KV is allocated for every token even on sliding-window layers, which vLLM would
recycle outside the window: exact, and simple, at the cost of that recycling.

Part of loopserve's engine hooks: the methods overridden here are checked in
`vllm_hooks` at import, the base-class state read here when the engine core builds its
managers.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassAttentionSpec(AttentionSpec):
    """The KV of the block's planes for pass `loop_pass` (>= 2).

    Not a `FullAttentionSpec`: vLLM merges full-attention layers into shared groups,
    and equal specs only (same pass) may share one here.
    """

    loop_pass: int

    @classmethod
    def of_layer(
        cls, layer_spec: AttentionSpec, loop_pass: int, block_size: int
    ) -> PassAttentionSpec:
        """The pass-`loop_pass` spec of a layer whose own spec is `layer_spec`.

        A windowed layer's spec carries its own block size and page padding; a plane
        allocates like a full-attention layer of the engine's block size.
        """
        fields = _attention_fields(layer_spec)
        if not isinstance(layer_spec, FullAttentionSpec):
            fields.update(block_size=block_size, page_size_padded=None)
        return cls(**fields, loop_pass=loop_pass)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        return FullAttentionSpec.max_memory_usage_bytes(self, vllm_config)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())

    def as_full_attention(self) -> FullAttentionSpec:
        """The same layout as full attention, for vLLM's full-attention prefix lookup."""
        return FullAttentionSpec(**_attention_fields(self))


def _attention_fields(spec: AttentionSpec) -> dict[str, Any]:
    """What every attention spec has: layout, dtype, heads, block size."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(AttentionSpec) if f.init}


class RequestDepths:
    """Each live request's depth, in the engine-core process that schedules it.

    Filled when the engine core admits a request; an entry goes with its request.
    `looking_up` names the request whose prefix-cache lookup is running, which vLLM's
    lookup (a class method that sees only block hashes) does not pass on.
    """

    def __init__(self) -> None:
        self._depths: dict[str, int] = {}
        self._looked_up: ContextVar[str | None] = ContextVar("loopserve_lookup", default=None)

    def add(self, request: Any, depth: int) -> None:
        request_id = request.request_id
        self._depths[request_id] = depth
        weakref.finalize(request, self._depths.pop, request_id, None)

    def of(self, request_id: str) -> int:
        try:
            return self._depths[request_id]
        except KeyError:
            raise RuntimeError(
                f"loopserve: no depth recorded for request {request_id!r}: the engine-core "
                "hook that records it did not run (vllm_hooks)"
            ) from None

    @contextmanager
    def looking_up(self, request_id: str) -> Iterator[None]:
        token = self._looked_up.set(request_id)
        try:
            yield
        finally:
            self._looked_up.reset(token)

    def of_lookup(self) -> int:
        request_id = self._looked_up.get()
        if request_id is None:
            raise RuntimeError(
                "loopserve: a prefix-cache lookup ran outside KVCacheManager."
                "get_computed_blocks, which loopserve hooks to learn its request's depth"
            )
        return self.of(request_id)


request_depths = RequestDepths()


class PassKVManager(FullAttentionManager):
    """Full-attention blocks for the requests that run this group's pass; null blocks
    for the others."""

    kv_cache_spec: PassAttentionSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What this manager reads of its base class's state; checked when the engine
        # core builds its managers, at start-up.
        missing = [
            name
            for name in ("req_to_blocks", "_null_block", "block_size")
            if not hasattr(self, name)
        ]
        if missing:
            raise RuntimeError(
                f"loopserve: vLLM's single-type KV manager has no {', '.join(missing)}; "
                "pass_kv.PassKVManager does not fit this release"
            )

    def _skipped_by(self, request_id: str) -> bool:
        return request_depths.of(request_id) < self.kv_cache_spec.loop_pass

    def get_num_blocks_to_allocate(self, request_id: str, *args: Any, **kwargs: Any) -> int:
        if self._skipped_by(request_id):
            return 0
        return super().get_num_blocks_to_allocate(request_id, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        if not self._skipped_by(request_id):
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        blocks = self.req_to_blocks[request_id]
        padding = [self._null_block] * max(cdiv(num_tokens, self.block_size) - len(blocks), 0)
        blocks.extend(padding)
        return padding

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Any,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: Any,
        kv_cache_spec: PassAttentionSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        if request_depths.of_lookup() < kv_cache_spec.loop_pass:
            # Nothing is held here at this depth: any length the other groups hit.
            length = max_length - max_length % alignment_tokens
            num_blocks = cdiv(length, kv_cache_spec.block_size * dcp_world_size)
            return tuple([block_pool.null_block] * num_blocks for _ in kv_cache_group_ids), length
        return super().find_longest_cache_hit(
            block_hashes,
            max_length,
            kv_cache_group_ids,
            block_pool,
            kv_cache_spec.as_full_attention(),
            drop_eagle_block,
            alignment_tokens,
            dcp_world_size,
            pcp_world_size,
        )


def check_groups(kv_cache_groups: list[Any], plane_passes: dict[str, int]) -> list[int]:
    """Refuse a KV-cache layout where a pass's planes share groups with other layers
    (every request would pay for every pass); return each group's pass (1: the model's
    own layers)."""
    passes = []
    for group in kv_cache_groups:
        spec = group.kv_cache_spec
        expected = {spec.loop_pass} if isinstance(spec, PassAttentionSpec) else {1}
        found = {plane_passes.get(name, 1) for name in group.layer_names} or expected
        if found != expected:
            raise RuntimeError(
                "loopserve: vLLM put the planes of different passes (or a pass and the "
                f"model's own layers) in one KV-cache group ({type(spec).__name__}, passes "
                f"{sorted(found)}), so every request would hold KV for every pass; run with "
                "vLLM's hybrid KV-cache manager (do not pass --disable-hybrid-kv-cache-manager)"
            )
        passes.append(expected.pop())
    return passes


def tokens_per_depth(
    num_blocks: int, block_size: int, group_passes: list[int], max_loops: int
) -> dict[int, int]:
    """Tokens the pool holds for requests all of one depth: a token of a k-deep request
    takes a slot in every group of passes 1..k."""
    usable = num_blocks - 1  # vLLM's null block aside
    return {
        k: usable * block_size // sum(1 for p in group_passes if p <= k)
        for k in range(1, max_loops + 1)
    }
