"""The loop step: Triton (interpreted on CPU) and PyTorch versions against a float64 reference.

The reference (`reference` below) is written out here from the contract, independently of
loop_step_torch, so that a bug in the PyTorch step fails these tests too.

Triton reads TRITON_INTERPRET when a function is wrapped by triton.jit, and triton.language's
own helpers (tl.sum, ...) are wrapped when triton is imported: so the variable is set here,
before anything below imports triton, and restored right after, so that modules collected
later and the processes they start (a vLLM engine) do not inherit it. It is set again only
while this module's tests run (loop_step.py wraps its kernel on first use; the cached kernel
is cleared on both sides). Two cases keep this process in compiled mode instead: triton was
already imported (another module imported vLLM first), or a GPU is present (vLLM's Triton
kernels in this process must stay compiled). Then the Triton tests skip here and
test_triton_in_subprocess reruns this file in a fresh process with the variable set.
"""

import importlib
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

_ENV = "TRITON_INTERPRET"
_saved = os.environ.get(_ENV)
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ[_ENV] = "1"
try:
    from loopserve.kernels import LoopStepOutput  # imports triton

    # The package exports the function `loop_step`, which shadows the submodule's name.
    ls = importlib.import_module("loopserve.kernels.loop_step")
    INTERPRETED = os.environ.get(_ENV) == "1"  # triton.language was wrapped for the interpreter
finally:
    if _saved is None:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = _saved

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton runs compiled in this process: see test_triton_in_subprocess"
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = list(TOL)
HIDDEN = [1, 33, 576, 960, 1000, 2048, 4096]
# (rows, which continue): empty, single row, and many rows with all / none / some continuing.
SHAPES = [(0, "none"), (1, "all"), (1, "none"), (37, "all"), (37, "none"), (37, "some")]
SPARE_ROWS = 5  # out_* rows no input row refers to: they must come back untouched


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter() -> Iterator[None]:
    """The loop-step kernel of this module's tests is wrapped for the interpreter (CPU tensors)."""
    with pytest.MonkeyPatch.context() as mp:
        if INTERPRETED:
            mp.setenv(_ENV, "1")
        ls._jit_kernel.cache_clear()
        yield
        ls._jit_kernel.cache_clear()


@pytest.fixture(autouse=True)
def interpreter_rounds_bf16_like_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32->bf16 in the interpreter as on GPUs (cvt.rn.bf16.f32): round to nearest even.

    Triton 3.9's interpreter truncates by default, and its RTNE branch rounds ties up without
    carrying into the exponent; without this the bf16 bitwise checks would test the interpreter.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def convert_rtne(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert_rtne)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh Triton outputs start as NaN, so any element the kernel skips shows up."""

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ls, "_alloc", alloc)


@dataclass
class Case:
    hidden: torch.Tensor
    residual: torch.Tensor
    rows: torch.Tensor
    next_slot: torch.Tensor
    num_next: int
    weight: torch.Tensor
    eps: float
    num_out: int

    def to(self, dtype: torch.dtype) -> "Case":
        """The same case with float tensors in `dtype` (float64: the reference)."""
        return Case(
            self.hidden.to(dtype),
            self.residual.to(dtype),
            self.rows,
            self.next_slot,
            self.num_next,
            self.weight.to(dtype),
            self.eps,
            self.num_out,
        )


def make_case(seed: int, m: int, h: int, dtype: torch.dtype, cont: str) -> Case:
    """Random inputs; row 1 (when present) sums to zero to exercise x == 0 (rstd = eps**-0.5)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g)
    residual = 2 * torch.randn(m, h, generator=g)
    if m > 1:
        hidden[1] = -residual[1]
    n = m + SPARE_ROWS
    rows = torch.randperm(n, generator=g)[:m]
    if cont == "all":
        continuing = torch.ones(m, dtype=torch.bool)
    elif cont == "none":
        continuing = torch.zeros(m, dtype=torch.bool)
    else:
        continuing = torch.rand(m, generator=g) < 0.5
        continuing[0], continuing[-1] = True, False
    num_next = int(continuing.sum())
    slot_dtype = torch.int32 if seed % 2 else torch.int64
    next_slot = torch.full((m,), -1, dtype=slot_dtype)
    next_slot[continuing] = torch.randperm(num_next, generator=g).to(slot_dtype)
    weight = 1 + 0.1 * torch.randn(h, generator=g)
    return Case(
        hidden.to(dtype),
        residual.to(dtype),
        rows,
        next_slot,
        num_next,
        weight.to(dtype),
        1e-6 if seed % 3 else 1e-5,
        n,
    )


def run(impl, case: Case) -> tuple[LoopStepOutput, torch.Tensor, torch.Tensor]:
    """Run `impl` on NaN-poisoned full-batch buffers; returns the output and both buffers."""
    shape, dtype = (case.num_out, case.hidden.shape[1]), case.hidden.dtype
    out_hidden = torch.full(shape, float("nan"), dtype=dtype)
    out_residual = torch.full(shape, float("nan"), dtype=dtype)
    out = impl(
        case.hidden,
        case.residual,
        case.rows,
        case.next_slot,
        case.num_next,
        case.weight,
        case.eps,
        out_hidden,
        out_residual,
    )
    return out, out_hidden, out_residual


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| (absolute when ref is all zero); NaN anywhere fails the bound."""
    assert a.shape == ref.shape
    if a.numel() == 0:
        return 0.0
    err = (a.double() - ref.double()).abs().max()
    scale = ref.double().abs().max()
    return float(err / scale if scale > 0 else err)


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(next_hidden, next_residual) in float64, row by row from the contract.

    x = hidden + residual; a continuing row i goes to slot next_slot[i] with
    x * (mean(x**2) + eps)**-0.5 * weight and x itself. Plain loops over rows: nothing shared
    with loop_step_torch (no sort, no index_select).
    """
    h = case.hidden.shape[1]
    next_hidden = torch.full((case.num_next, h), float("nan"), dtype=torch.float64)
    next_residual = torch.full((case.num_next, h), float("nan"), dtype=torch.float64)
    weight = case.weight.double()
    for i, slot in enumerate(case.next_slot.tolist()):
        if slot < 0:
            continue
        x = case.hidden[i].double() + case.residual[i].double()
        rms = (x.square().sum() / h + case.eps) ** 0.5
        next_hidden[slot] = x / rms * weight
        next_residual[slot] = x
    return next_hidden, next_residual


def check(impl, case: Case) -> LoopStepOutput:
    """Everything the contract promises, against the float64 reference."""
    h = case.hidden.shape[1]
    dtype = case.hidden.dtype
    out, out_hidden, out_residual = run(impl, case)
    ref_hidden, ref_residual = reference(case)

    assert out.next_hidden.shape == out.next_residual.shape == (case.num_next, h)
    assert out.next_hidden.dtype == out.next_residual.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(out.next_hidden, ref_hidden) < tol
    assert rel_err(out.next_residual, ref_residual) < tol

    # Finished rows: bit copies at their batch row; every other buffer row untouched (NaN).
    finished = case.next_slot < 0
    dst = case.rows[finished]
    assert torch.equal(out_hidden[dst], case.hidden[finished])
    assert torch.equal(out_residual[dst], case.residual[finished])
    untouched = torch.ones(case.num_out, dtype=torch.bool)
    untouched[dst] = False
    assert out_hidden[untouched].isnan().all() and out_residual[untouched].isnan().all()

    # next_residual is x rounded once: bitwise whatever the implementation.
    x = case.hidden.float() + case.residual.float()
    expect = torch.empty(case.num_next, h, dtype=dtype)
    expect[case.next_slot[~finished].long()] = x[~finished].to(dtype)
    assert torch.equal(out.next_residual, expect)
    return out


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize(("m", "cont"), SHAPES)
def test_triton_matches_reference(dtype: torch.dtype, h: int, m: int, cont: str) -> None:
    case = make_case(zlib.crc32(f"{h}-{m}-{cont}-{dtype}".encode()), m, h, dtype, cont)
    out = check(ls.loop_step_triton, case)
    torch_out, _, _ = run(ls.loop_step_torch, case)
    assert rel_err(out.next_hidden, torch_out.next_hidden) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize(("m", "cont"), SHAPES)
def test_torch_matches_reference(dtype: torch.dtype, h: int, m: int, cont: str) -> None:
    check(ls.loop_step_torch, make_case(h * 1000 + m + len(cont), m, h, dtype, cont))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("h", "max_block"), [(33, 16), (1000, 256), (4096, 1024)])
@pytest.mark.parametrize("cont", ["all", "none", "some"])
def test_triton_chunked_rows(dtype: torch.dtype, h: int, max_block: int, cont: str) -> None:
    """Rows wider than the register block take the two-pass chunk loop."""
    case = make_case(h + max_block + len(cont), 9, h, dtype, cont)
    check(lambda *args: ls.loop_step_triton(*args, max_block=max_block), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_is_vllm_fused_add_rms_norm_bitwise(dtype: torch.dtype) -> None:
    """The exact formula of vLLM's native fused_add_rms_norm, row by row, in slot order."""
    case = make_case(7, 37, 960, dtype, "some")
    out, _, _ = run(ls.loop_step_torch, case)
    x32 = case.hidden.to(torch.float32) + case.residual.to(torch.float32)
    x_residual = x32.to(dtype)
    var = x32.pow(2).mean(dim=-1, keepdim=True)
    normed = x32 * torch.rsqrt(var + case.eps)
    normed = (normed.to(case.weight.dtype) * case.weight).to(dtype)
    order = torch.argsort(case.next_slot)[case.hidden.shape[0] - case.num_next :]
    assert torch.equal(out.next_residual, x_residual[order])
    assert torch.equal(out.next_hidden, normed[order])


@needs_interpreter
def test_fp32_weight_with_bf16_stream() -> None:
    """The weight may be kept in another dtype than the stream: the norm follows its dtype."""
    case = make_case(11, 37, 576, torch.bfloat16, "some")
    case.weight = case.weight.float()
    triton_out = check(ls.loop_step_triton, case)
    torch_out = check(ls.loop_step_torch, case)
    assert rel_err(triton_out.next_hidden, torch_out.next_hidden) < TOL[torch.bfloat16]


@needs_interpreter
def test_strided_rows() -> None:
    """Inputs that are column slices of wider tensors (row stride > H) are read correctly."""
    case = make_case(5, 37, 576, torch.float32, "some")
    for name in ("hidden", "residual"):
        wide = torch.zeros(37, 1000)
        wide[:, 100:676] = getattr(case, name)
        setattr(case, name, wide[:, 100:676])
    check(ls.loop_step_triton, case)


def test_rejects_mismatched_shapes() -> None:
    case = make_case(3, 4, 33, torch.float32, "some")
    case.weight = case.weight[:-1]
    with pytest.raises(ValueError, match="weight"):
        run(ls.loop_step_torch, case)


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the block fuses: env first, then Triton on CUDA, the layer's own norm else."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ls.KERNEL_ENV, raising=False)
    assert ls.kernel_backend(cpu) == "torch"
    assert ls.kernel_backend(cuda) == "triton"
    monkeypatch.setenv(ls.KERNEL_ENV, "torch")
    assert ls.kernel_backend(cuda) == "torch"
    monkeypatch.setenv(ls.KERNEL_ENV, "triton")
    assert ls.kernel_backend(cpu) == "triton"
    monkeypatch.setenv(ls.KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match=ls.KERNEL_ENV):
        ls.kernel_backend(cpu)


@pytest.mark.skipif(INTERPRETED, reason="the Triton tests ran in this process")
def test_triton_in_subprocess() -> None:
    """This file again in a fresh process with TRITON_INTERPRET=1, where nothing skips."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, _ENV: "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
