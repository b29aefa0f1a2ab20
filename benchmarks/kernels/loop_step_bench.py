"""Loop-step benchmark: the fused Triton step vs the unfused PyTorch ops vs a plain copy.

The step is memory bound, so the yardstick is a device-to-device copy moving the same bytes:
"fused/copy %" near 100 means the kernel runs at copy bandwidth. Correctness (Triton vs
PyTorch vs a float64 reference, on the GPU) is checked first; a failure exits 1.

Runs where neither loopserve nor vLLM is installed: kernels/loop_step.py is loaded by path.

    python benchmarks/kernels/loop_step_bench.py            # CUDA machine, well under 5 min
    python benchmarks/kernels/loop_step_bench.py --dry-run  # CPU: byte model, interpreted check

With OUT set, the results also go to $OUT/loop_step_bench.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
ROWS = (1, 16, 256, 1024, 4096, 16384)
HIDDEN = (2048, 4096)
# Correctness shapes: odd sizes, and 12288 > MAX_BLOCK for the two-pass chunk loop.
CHECK_HIDDEN = (576, 1000, 2048, 4096, 12288)
CHECK_ROWS = (0, 1, 37, 1000)
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_loop_step() -> ModuleType:
    """kernels/loop_step.py as a standalone module (it imports nothing from the package)."""
    path = REPO / "kernels" / "loop_step.py"
    spec = importlib.util.spec_from_file_location("loopserve_loop_step_bench", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Byte model


def fused_bytes_per_row(h: int, elt: int, slot_elt: int = 8) -> int:
    """DRAM bytes per row of the fused step.

    Reads hidden and residual (2*H*elt); writes one pair, either the next pass's
    (next_hidden, next_residual) or the finished (out_hidden, out_residual) (2*H*elt); reads
    rows (8) and next_slot (slot_elt). The weight (H*w_elt) is read once per launch from DRAM
    and then served from L2, so it is counted per launch, not per row.
    """
    return 4 * h * elt + 8 + slot_elt


def fused_bytes(m: int, h: int, elt: int, w_elt: int, slot_elt: int = 8) -> int:
    return m * fused_bytes_per_row(h, elt, slot_elt) + h * w_elt


def unfused_ops(
    h: int, elt: int, w_elt: int, frac_next: float, slot_elt: int = 8
) -> list[tuple[str, float, int, int]]:
    """(op, fraction of the M rows it touches, bytes read, bytes written) per row touched.

    Each op of loop_step_torch is a separate kernel that reads its inputs from and writes its
    output to memory. Casts to the dtype a tensor already has are free (torch returns self).
    Small per-row scalars (norms, rstd) and index reads are counted; sort internals beyond one
    read and one write of the keys are not; the weight, as in the fused model, is not per row.
    """
    f32 = 4
    up = elt != f32  # .to(float32) copies
    ops: list[tuple[str, float, int, int]] = []
    if up:
        ops += [
            ("hidden.to(fp32)", 1, h * elt, h * f32),
            ("residual.to(fp32)", 1, h * elt, h * f32),
        ]
    ops += [
        ("x = h + r", 1, 2 * h * f32, h * f32),
        ("argsort(next_slot)", 1, slot_elt, 8),
    ]
    fin = 1 - frac_next
    ops += [
        ("rows[finished]", fin, 16, 8),
        ("hidden[finished]", fin, h * elt + 8, h * elt),
        ("residual[finished]", fin, h * elt + 8, h * elt),
        ("out_hidden.index_copy_", fin, h * elt + 8, h * elt),
        ("out_residual.index_copy_", fin, h * elt + 8, h * elt),
        ("x[continuing]", frac_next, h * f32 + 8, h * f32),
        ("x.pow(2)", frac_next, h * f32, h * f32),
        (".mean", frac_next, h * f32, 4),
        ("+ eps, rsqrt", frac_next, 8, 8),
        ("x * rstd", frac_next, h * f32 + 4, h * f32),
    ]
    if w_elt != f32:
        ops.append(("normed.to(w dtype)", frac_next, h * f32, h * w_elt))
    ops.append(("* weight (weight from L2)", frac_next, h * w_elt, h * w_elt))
    if w_elt != elt:
        ops.append(("normed.to(orig)", frac_next, h * w_elt, h * elt))
    if up:
        ops.append(("x.to(orig) (next_residual)", frac_next, h * f32, h * elt))
    return ops


def unfused_bytes_per_row(h: int, elt: int, w_elt: int, frac_next: float) -> float:
    return sum(frac * (r + w) for _, frac, r, w in unfused_ops(h, elt, w_elt, frac_next))


def print_byte_model(dtypes: list[str], frac_next: float = 0.5) -> dict:
    """Bytes per row, fused vs unfused, for the benchmark's hidden sizes; also returned."""
    model = {}
    print(f"byte model, {frac_next:.0%} of rows continuing (bytes per row):")
    print(f"{'dtype':>9} {'hidden':>6} {'fused':>8} {'unfused':>9} {'ratio':>6}")
    for name in dtypes:
        elt = ELT[name]
        for h in HIDDEN:
            fused = fused_bytes_per_row(h, elt)
            unfused = unfused_bytes_per_row(h, elt, elt, frac_next)
            model[f"{name}/{h}"] = {"fused": fused, "unfused": unfused}
            print(f"{name:>9} {h:>6} {fused:>8} {unfused:>9.0f} {unfused / fused:>5.2f}x")
    h, name = HIDDEN[0], dtypes[0]
    print(f"unfused ops for {name}, H={h} (fraction of rows, read, written):")
    for op, frac, r, w in unfused_ops(h, ELT[name], ELT[name], frac_next):
        print(f"  {op:<28} {frac:>4.2f} {r:>7} {w:>7}")
    return model


# ---------------------------------------------------------------------------------------------
# Inputs and correctness


def make_inputs(torch, m: int, h: int, dtype, device, num_next: int, seed: int) -> dict:
    """Random step inputs; `num_next` rows continue, with a random permutation of slots."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": g, "device": device}
    hidden = torch.randn(m, h, **kw)
    residual = 2 * torch.randn(m, h, **kw)
    n = m + 5
    rows = torch.randperm(n, **kw)[:m]
    next_slot = torch.full((m,), -1, dtype=torch.int64, device=device)
    chosen = torch.randperm(m, **kw)[:num_next]
    next_slot[chosen] = torch.randperm(num_next, **kw)
    weight = 1 + 0.1 * torch.randn(h, **kw)
    return {
        "hidden": hidden.to(dtype),
        "residual": residual.to(dtype),
        "rows": rows,
        "next_slot": next_slot,
        "num_next": num_next,
        "weight": weight.to(dtype),
        "eps": 1e-6,
        "out_hidden": torch.full((n, h), float("nan"), dtype=dtype, device=device),
        "out_residual": torch.full((n, h), float("nan"), dtype=dtype, device=device),
    }


def fresh_buffers(torch, inputs: dict, dtype=None) -> dict:
    """The same inputs with NaN-poisoned out buffers (float tensors cast to `dtype` if given)."""
    out = dict(inputs)
    if dtype is not None:
        for key in ("hidden", "residual", "weight"):
            out[key] = inputs[key].to(dtype)
    ref = out["hidden"]
    for key in ("out_hidden", "out_residual"):
        out[key] = torch.full(inputs[key].shape, float("nan"), dtype=ref.dtype, device=ref.device)
    return out


def rel_err(a, ref) -> float:
    if a.numel() == 0:
        return 0.0
    err = (a.double() - ref.double()).abs().max()
    scale = ref.double().abs().max()
    return float(err / scale if scale > 0 else err)


def check_case(torch, ls: ModuleType, m: int, h: int, dtype, device, bitwise: bool) -> dict:
    """Triton vs PyTorch vs float64 on one shape; returns a record with `ok`."""
    name = str(dtype).removeprefix("torch.")
    inputs = make_inputs(torch, m, h, dtype, device, m // 2, seed=m * 7919 + h)
    runs = {}
    for label, impl, cast in (
        ("triton", ls.loop_step_triton, None),
        ("torch", ls.loop_step_torch, None),
        ("fp64", ls.loop_step_torch, torch.float64),
    ):
        args = fresh_buffers(torch, inputs, cast)
        runs[label] = (impl(**args), args["out_hidden"], args["out_residual"])
    (tri, tri_oh, tri_or), (tor, tor_oh, tor_or), (ref, _, _) = (
        runs["triton"],
        runs["torch"],
        runs["fp64"],
    )
    errors = {
        key: rel_err(getattr(tri, key), getattr(ref, key))
        for key in ("next_hidden", "next_residual")
    }
    ok = all(e < TOL[name] for e in errors.values())
    ok &= not any(getattr(tri, k).isnan().any() for k in ("next_hidden", "next_residual"))
    # The out buffers: same bits where written, NaN (untouched) elsewhere, in both versions.
    ok &= torch.equal(tri_oh.nan_to_num(7.0), tor_oh.nan_to_num(7.0))
    ok &= torch.equal(tri_or.nan_to_num(7.0), tor_or.nan_to_num(7.0))
    written = (~tor_oh.isnan()).all(dim=1).sum().item()
    ok &= written == m - m // 2
    if bitwise:
        ok &= torch.equal(tri.next_residual, tor.next_residual)
    same = (tri.next_hidden == tor.next_hidden).float().mean().item() if m // 2 else 1.0
    return {
        "dtype": name,
        "rows": m,
        "hidden": h,
        "ok": bool(ok),
        "rel_err": errors,
        "next_hidden_bitwise_equal_to_torch": same,
    }


def check_all(torch, ls: ModuleType, device, dtypes, hiddens, rows, bitwise: bool) -> list[dict]:
    records = []
    for name in dtypes:
        for h in hiddens:
            for m in rows:
                rec = check_case(torch, ls, m, h, getattr(torch, name), device, bitwise)
                records.append(rec)
                errs = " ".join(f"{k}={v:.1e}" for k, v in rec["rel_err"].items())
                status = "ok  " if rec["ok"] else "FAIL"
                print(
                    f"check {status} {name:>8} H={h:<5} M={m:<5} {errs} "
                    f"next_hidden==torch {rec['next_hidden_bitwise_equal_to_torch']:.1%}"
                )
    return records


# ---------------------------------------------------------------------------------------------
# Timing


def bench_table(
    torch, ls: ModuleType, device, dtypes, hiddens, rows, timer: Callable[[Callable], float]
) -> list[dict]:
    """Fused, unfused and copy times (µs) per shape; half the rows continue."""
    table = []
    header = (
        f"{'rows':>6} {'hidden':>6} {'dtype':>8} {'bytes':>11} {'fused µs':>9} "
        f"{'unfused µs':>10} {'speedup':>7} {'fused GB/s':>10} {'copy GB/s':>9} {'fused/copy':>10}"
    )
    print(header)
    for name in dtypes:
        dtype, elt = getattr(torch, name), ELT[name]
        for h in hiddens:
            for m in rows:
                args = make_inputs(torch, m, h, dtype, device, m // 2, seed=m + h)
                nbytes = fused_bytes(m, h, elt, elt)
                # A copy of nbytes/2 reads nbytes/2 and writes nbytes/2: same traffic as the step.
                src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                fused = timer(lambda args=args: ls.loop_step_triton(**args))
                unfused = timer(lambda args=args: ls.loop_step_torch(**args))
                copy = timer(lambda src=src, dst=dst: dst.copy_(src))
                row = {
                    "rows": m,
                    "hidden": h,
                    "dtype": name,
                    "bytes": nbytes,
                    "fused_us": fused,
                    "unfused_us": unfused,
                    "speedup": unfused / fused,
                    "fused_gbps": nbytes / fused / 1e3,
                    "copy_gbps": 2 * (nbytes // 2) / copy / 1e3,
                    "fused_over_copy_pct": 100 * copy / fused,
                    "unfused_bytes_model": m * unfused_bytes_per_row(h, elt, elt, 0.5),
                }
                table.append(row)
                print(
                    f"{m:>6} {h:>6} {name:>8} {nbytes:>11} {fused:>9.2f} {unfused:>10.2f} "
                    f"{row['speedup']:>6.2f}x {row['fused_gbps']:>10.1f} "
                    f"{row['copy_gbps']:>9.1f} {row['fused_over_copy_pct']:>9.1f}%"
                )
                del args, src, dst
    return table


def cuda_timer(fn: Callable) -> float:
    """Median µs by triton.testing.do_bench (L2 flushed between runs)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def wall_timer(fn: Callable) -> float:
    """Median µs of 3 wall-clock runs: the dry run only exercises the table code."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - start))
    return sorted(times)[1]


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU only: byte model, tiny TRITON_INTERPRET correctness check, tiny table",
    )
    parser.add_argument("--dtypes", default="bfloat16,float32", help="timed dtypes")
    opts = parser.parse_args()
    dtypes = opts.dtypes.split(",")
    if opts.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the module below)

    import torch

    ls = load_loop_step()
    result: dict = {"byte_model": print_byte_model(dtypes)}
    if opts.dry_run:
        device = torch.device("cpu")
        # The interpreter truncates fp32->bf16 (GPUs round to nearest even): bf16 is left to
        # the GPU run and the unit tests (which patch the interpreter's rounding).
        checks = check_all(torch, ls, device, ["float32", "float16"], (33, 576), (0, 1, 7), True)
        timer, hiddens, rows, bench_dtypes = wall_timer, (64,), (1, 16), ["float32"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        result["device"] = torch.cuda.get_device_name()
        import triton

        result["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
        print(f"{result['device']}, torch {torch.__version__}, triton {triton.__version__}")
        checks = check_all(
            torch, ls, device, ["bfloat16", "float32"], CHECK_HIDDEN, CHECK_ROWS, True
        )
        timer, hiddens, rows, bench_dtypes = cuda_timer, HIDDEN, ROWS, dtypes
    result["checks"] = checks
    ok = all(c["ok"] for c in checks)
    if ok:
        result["table"] = bench_table(torch, ls, device, bench_dtypes, hiddens, rows, timer)
    else:
        print("correctness FAILED: no timing", file=sys.stderr)
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "loop_step_bench.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
