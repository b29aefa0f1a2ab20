"""The per-pass loop step of the looped block: one contract, a PyTorch and a Triton version.

After each pass of the looped block, for the M rows that ran it: x = hidden + residual (the
residual stream), finished rows hand their (hidden, residual) pair to the layers after the
block through full-batch buffers, and continuing rows get the next pass's inputs, compacted
into slot order: RMSNorm(x) (the block's first input_layernorm) and x.

`loop_step_triton` does the whole step in one read of the inputs and one write of the
outputs on CUDA, where the unfused ops (~17 kernels) move about 7x the bytes in bf16
(benchmarks/kernels/loop_step_bench.py --dry-run). `loop_step_torch` is the same contract
in PyTorch, reproducing vLLM's native `fused_add_rms_norm` bit for bit: the reference the
kernel is tested and benchmarked against. `kernel_backend` says whether the looped block
fuses its hand-over at all (Triton; on the CPU the layer applies its own norm);
`LOOPSERVE_KERNEL=torch|triton` overrides the choice.

This file imports nothing from the package, so benchmarks can load it by path on a machine
where loopserve (and vLLM) are not installed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: CPU-only hosts run the PyTorch version.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

KERNEL_ENV = "LOOPSERVE_KERNEL"
# Widest row held in registers at once; wider rows take two passes over their chunks.
MAX_BLOCK = 8192


@dataclass(frozen=True)
class LoopStepOutput:
    """Inputs of the next pass: the continuing rows, in slot order."""

    next_hidden: torch.Tensor  # [num_next, H], hidden's dtype: rms_norm(x) * weight
    next_residual: torch.Tensor  # [num_next, H], hidden's dtype: x


def _check(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    rows: torch.Tensor,
    next_slot: torch.Tensor,
    num_next: int,
    weight: torch.Tensor,
    out_hidden: torch.Tensor,
    out_residual: torch.Tensor,
) -> None:
    """Cheap shape/dtype checks: a mismatch here would otherwise corrupt memory silently."""
    m, h = hidden.shape
    if residual.shape != (m, h):
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and residual {tuple(residual.shape)} "
            "must have the same shape"
        )
    if residual.dtype != hidden.dtype:
        raise ValueError("hidden and residual must share a dtype")
    if rows.shape != (m,) or next_slot.shape != (m,):
        raise ValueError(f"rows and next_slot must have shape ({m},)")
    if not 0 <= num_next <= m:
        raise ValueError(f"num_next={num_next} is outside [0, {m}]")
    if weight.shape != (h,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({h},)")
    for name, buf in (("out_hidden", out_hidden), ("out_residual", out_residual)):
        if buf.dim() != 2 or buf.shape[1] != h or buf.dtype != hidden.dtype:
            raise ValueError(f"{name} must be [N, {h}] of dtype {hidden.dtype}")


def loop_step_torch(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    rows: torch.Tensor,
    next_slot: torch.Tensor,
    num_next: int,
    weight: torch.Tensor,
    eps: float,
    out_hidden: torch.Tensor,
    out_residual: torch.Tensor,
) -> LoopStepOutput:
    """The loop step in PyTorch ops, bitwise equal to vLLM's native fused_add_rms_norm.

    Sync-free (no nonzero/item): a stable sort of next_slot puts the finished rows (-1) first
    and the continuing rows after them in slot order, since slots are a permutation of
    range(num_next). float64 inputs compute in float64 (the tests' reference).
    """
    _check(hidden, residual, rows, next_slot, num_next, weight, out_hidden, out_residual)
    m, h = hidden.shape
    orig = hidden.dtype
    acc = torch.promote_types(orig, torch.float32)
    if m == 0:
        empty = hidden.new_empty((0, h))
        return LoopStepOutput(empty, empty.clone())
    x = hidden.to(acc) + residual.to(acc)

    order = torch.argsort(next_slot, stable=True)
    finished, continuing = order[: m - num_next], order[m - num_next :]
    if m > num_next:
        dst = rows.index_select(0, finished)
        out_hidden.index_copy_(0, dst, hidden.index_select(0, finished))
        out_residual.index_copy_(0, dst, residual.index_select(0, finished))

    xc = x.index_select(0, continuing)
    variance = xc.pow(2).mean(dim=-1, keepdim=True)
    normed = xc * torch.rsqrt(variance + eps)
    next_hidden = (normed.to(weight.dtype) * weight).to(orig)
    return LoopStepOutput(next_hidden, xc.to(orig))


if triton is not None:

    def _loop_step_kernel(
        hidden_ptr,
        residual_ptr,
        rows_ptr,
        slot_ptr,
        weight_ptr,
        next_hidden_ptr,
        next_residual_ptr,
        out_hidden_ptr,
        out_residual_ptr,
        stride_hidden,
        stride_residual,
        stride_next,
        stride_out_hidden,
        stride_out_residual,
        H,
        eps,
        BLOCK: tl.constexpr,
        NUM_CHUNKS: tl.constexpr,
    ):
        """One program per row; the continue/finish choice is made here from next_slot."""
        pid = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + pid).to(tl.int64)
        dst = tl.load(rows_ptr + pid).to(tl.int64)
        h_row = hidden_ptr + pid * stride_hidden
        r_row = residual_ptr + pid * stride_residual
        # Clamped so finished rows (slot -1) never form an out-of-range pointer.
        nh_row = next_hidden_ptr + tl.maximum(slot, 0) * stride_next
        nr_row = next_residual_ptr + tl.maximum(slot, 0) * stride_next
        oh_row = out_hidden_ptr + dst * stride_out_hidden
        or_row = out_residual_ptr + dst * stride_out_residual
        cols = tl.arange(0, BLOCK)
        if NUM_CHUNKS == 1:  # whole row in registers: exactly one read and one write
            mask = cols < H
            h = tl.load(h_row + cols, mask=mask, other=0.0)
            r = tl.load(r_row + cols, mask=mask, other=0.0)
            x = h.to(tl.float32) + r.to(tl.float32)
            sum_sq = tl.sum(x * x, axis=0)
            if slot >= 0:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                normed = x * tl.rsqrt(sum_sq / H + eps)
                # torch's (normed.to(w.dtype) * w).to(orig), product in fp32: exact for bf16/fp16
                # operands, so one rounding gives torch's bits (and the interpreter lacks bf16 math)
                out = (normed.to(w.dtype).to(tl.float32) * w.to(tl.float32)).to(w.dtype)
                tl.store(nh_row + cols, out.to(h.dtype), mask=mask)
                tl.store(nr_row + cols, x.to(h.dtype), mask=mask)
            else:
                tl.store(oh_row + cols, h, mask=mask)
                tl.store(or_row + cols, r, mask=mask)
        else:  # wide rows: pass 1 reduces and writes x/out pair, pass 2 re-reads for the norm
            acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                offs = c * BLOCK + cols
                mask = offs < H
                h = tl.load(h_row + offs, mask=mask, other=0.0)
                r = tl.load(r_row + offs, mask=mask, other=0.0)
                x = h.to(tl.float32) + r.to(tl.float32)
                acc_sq += x * x
                if slot >= 0:
                    tl.store(nr_row + offs, x.to(h.dtype), mask=mask)
                else:
                    tl.store(oh_row + offs, h, mask=mask)
                    tl.store(or_row + offs, r, mask=mask)
            sum_sq = tl.sum(acc_sq, axis=0)
            if slot >= 0:
                rstd = tl.rsqrt(sum_sq / H + eps)
                for c in range(NUM_CHUNKS):
                    offs = c * BLOCK + cols
                    mask = offs < H
                    h = tl.load(h_row + offs, mask=mask, other=0.0)
                    r = tl.load(r_row + offs, mask=mask, other=0.0)
                    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
                    x = h.to(tl.float32) + r.to(tl.float32)
                    out = ((x * rstd).to(w.dtype).to(tl.float32) * w.to(tl.float32)).to(w.dtype)
                    tl.store(nh_row + offs, out.to(h.dtype), mask=mask)


@functools.cache
def _jit_kernel():
    """Wrapped on first use: triton.jit reads TRITON_INTERPRET then, so tests can scope it."""
    if triton is None:
        raise ImportError("loop_step_triton needs triton, which is not installed")
    return triton.jit(_loop_step_kernel)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation, in one place so tests can poison it (every element must be written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernel indexes rows by stride but needs unit stride along the hidden dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def loop_step_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    rows: torch.Tensor,
    next_slot: torch.Tensor,
    num_next: int,
    weight: torch.Tensor,
    eps: float,
    out_hidden: torch.Tensor,
    out_residual: torch.Tensor,
    *,
    max_block: int = MAX_BLOCK,
) -> LoopStepOutput:
    """The loop step as one Triton kernel (one program per row); `max_block` is for tests."""
    kernel = _jit_kernel()  # raises ImportError first where triton is missing
    _check(hidden, residual, rows, next_slot, num_next, weight, out_hidden, out_residual)
    if out_hidden.stride(-1) != 1 or out_residual.stride(-1) != 1:
        raise ValueError("out_hidden and out_residual need unit stride along the hidden dim")
    m, h = hidden.shape
    device = hidden.device
    next_hidden = _alloc((num_next, h), hidden.dtype, device)
    next_residual = _alloc((num_next, h), hidden.dtype, device)
    if m == 0:
        return LoopStepOutput(next_hidden, next_residual)
    hidden, residual = _rows_contiguous(hidden), _rows_contiguous(residual)
    block = min(triton.next_power_of_2(h), triton.next_power_of_2(max_block))
    kernel[(m,)](
        hidden,
        residual,
        rows.contiguous(),
        next_slot.contiguous(),
        weight.contiguous(),
        next_hidden,
        next_residual,
        out_hidden,
        out_residual,
        hidden.stride(0),
        residual.stride(0),
        h,  # next_hidden and next_residual are fresh contiguous [num_next, h]
        out_hidden.stride(0),
        out_residual.stride(0),
        h,
        float(eps),
        BLOCK=block,
        NUM_CHUNKS=triton.cdiv(h, block),
        num_warps=min(max(block // 256, 1), 16),
    )
    return LoopStepOutput(next_hidden, next_residual)


def kernel_backend(device: torch.device) -> str:
    """'triton' (fused hand-over) or 'torch' (the layer's own norm) on `device`.

    `LOOPSERVE_KERNEL` (torch|triton) overrides; otherwise Triton on CUDA when importable.
    Read per call so tests and operators can switch it without re-importing.
    """
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{KERNEL_ENV}={forced!r}: expected torch, triton or auto")
    return "triton" if device.type == "cuda" and triton is not None else "torch"
