"""The loop plan: which block of layers loops, and how often it may.

One type, used by the engine, the vLLM model, the FLOPs model and the HTTP layer, so
that "what runs for loops=k" is decided in exactly one place. Torch-free on purpose:
the HTTP layer validates against it without importing the model stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_BLOCK_SIZE = 4
LOOPS_KEY = "loops"
# The HF config key (set through `hf_overrides`) that carries the plan into every vLLM
# process.
PLAN_CONFIG_KEY = "loop_plan"
# vLLM architectures whose own model class loopserve runs looped (each one tested). Any
# of them follows vLLM's decoder-layer contract: `layer(positions, hidden_states,
# residual) -> (hidden_states, residual)`, one `Attention` per layer.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
LOOPED_PREFIX = "Looped"


class LoopPlanError(ValueError):
    """A loop plan or a loop count that cannot run; the message says why."""


def looped_architecture(architecture: str) -> str:
    """The vLLM architecture name under which `architecture` runs looped."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise LoopPlanError(
            f"architecture {architecture!r} is not supported; loopserve loops "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return LOOPED_PREFIX + architecture


def default_block(num_layers: int, size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, int]:
    """The middle `size` layers: the block the seed paper loops in depth-grown models."""
    if num_layers < 1:
        raise LoopPlanError(f"a model needs at least one layer, got {num_layers}")
    size = min(size, num_layers)
    start = (num_layers - size) // 2
    return start, start + size


def parse_block(text: str) -> tuple[int, int]:
    """Parse `START:END` (0-indexed, END exclusive) as given on the command line."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise LoopPlanError(f"loop block must look like START:END (e.g. 13:17), got {text!r}")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class LoopPlan:
    """Block `[start, end)` of a `num_layers` model runs `k` times, `1 <= k <= max_loops`."""

    num_layers: int
    start: int
    end: int
    max_loops: int = 4
    default_loops: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "start", "end", "max_loops", "default_loops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LoopPlanError(f"{name} must be an integer, got {value!r}")
        if not 0 <= self.start < self.end <= self.num_layers:
            raise LoopPlanError(
                f"loop block [{self.start}, {self.end}) must satisfy "
                f"0 <= start < end <= num_layers ({self.num_layers})"
            )
        if self.max_loops < 1:
            raise LoopPlanError(f"max_loops must be >= 1, got {self.max_loops}")
        if not 1 <= self.default_loops <= self.max_loops:
            raise LoopPlanError(
                f"default_loops must be in [1, max_loops={self.max_loops}], "
                f"got {self.default_loops}"
            )

    @classmethod
    def for_model(
        cls,
        num_layers: int,
        block: tuple[int, int] | None = None,
        max_loops: int = 4,
        default_loops: int = 1,
    ) -> LoopPlan:
        start, end = block if block is not None else default_block(num_layers)
        return cls(num_layers, start, end, max_loops, default_loops)

    @property
    def block_size(self) -> int:
        return self.end - self.start

    def executed_depth(self, loops: int) -> int:
        """Layers a token runs through with `loops` passes of the block."""
        return self.num_layers + (loops - 1) * self.block_size

    def executed_layers(self, loops: int) -> list[int]:
        """Layer indices in execution order: prelude, block x loops, coda."""
        block = list(range(self.start, self.end))
        return list(range(self.start)) + block * loops + list(range(self.end, self.num_layers))

    def check_loops(self, loops: Any) -> int:
        """Validate a requested loop count; return it as an int."""
        if isinstance(loops, bool) or not isinstance(loops, int):
            raise LoopPlanError(f"'{LOOPS_KEY}' must be an integer, got {loops!r}")
        if not 1 <= loops <= self.max_loops:
            raise LoopPlanError(
                f"'{LOOPS_KEY}' must be between 1 and max_loops={self.max_loops}, got {loops}"
            )
        return loops

    def loops_of(self, extra_args: dict[str, Any] | None) -> int:
        """The loop count a request asked for in `SamplingParams.extra_args`."""
        if not extra_args or LOOPS_KEY not in extra_args:
            return self.default_loops
        return self.check_loops(extra_args[LOOPS_KEY])

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopPlan:
        return cls(**data)


def plan_from_hf_config(hf_config: Any) -> LoopPlan:
    """The plan an HF config carries (set through `hf_overrides`), else the default one.

    Takes the config object vLLM builds or its dict form.
    """
    if isinstance(hf_config, dict):
        data, num_layers = hf_config.get(PLAN_CONFIG_KEY), hf_config.get("num_hidden_layers")
    else:
        data = getattr(hf_config, PLAN_CONFIG_KEY, None)
        num_layers = getattr(hf_config, "num_hidden_layers", None)
    if data is None:
        return LoopPlan.for_model(num_layers)
    return LoopPlan.from_dict(dict(data))


def loop_cache_salt(plan: LoopPlan, loops: int, client_salt: str | None) -> str:
    """The prefix-cache salt of every request a looped engine runs.

    KV depends on the request's depth and on the plan that produced it, so both lead
    the salt of every request (the default depth too), and the client's own salt comes
    last. Every salt starts with the same fixed-format fields, so two requests share a
    salt only if they share plan, depth and client salt: a client salt can never
    spell another depth's key. vLLM also refuses '@' in client salts.
    """
    plan_key = "-".join(str(value) for value in plan.to_dict().values())
    return f"loopserve@plan={plan_key}@loops={loops}@{client_salt or ''}"
