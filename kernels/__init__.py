"""loopserve.kernels: the looped block's fused per-pass step (Triton; PyTorch reference)."""

from loopserve.kernels.loop_step import LoopStepOutput, loop_step_torch, loop_step_triton

__all__ = ["LoopStepOutput", "loop_step_torch", "loop_step_triton"]
