"""loopserve.kernels: the looped block's fused per-pass step (PyTorch and Triton)."""

from loopserve.kernels.loop_step import LoopStepOutput, loop_step

__all__ = ["LoopStepOutput", "loop_step"]
