"""`loopserve bench diagnose`: what extra passes of the block do inside the model.

Runs the unrolled reference (fp32 transformers model, layers listed in executed order) on a
few suite prompts at each loop count and, through forward hooks, reads at the last prompt
position after every executed layer (prelude, each pass of the block, coda):
- the logit lens: `lm_head(final_norm(h))`, whether the gold answer's first token is top-1
  and its rank (the seed paper's and its companion's probe of iterative refinement);
- the residual-stream norm ||h_out|| and the relative update ||h_out - h_in|| / ||h_in||;
- the ratio of the attention output's norm to the MLP output's norm.
Plotted against executed depth with one line per k, a reader sees whether extra passes move
the answer up the ranking (refine) or away from it (derail).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from loopserve.benchmarks import plots, report
from loopserve.benchmarks.accuracy import model_path_of, suite_examples
from loopserve.benchmarks.tasks import Example, continuation


class LayerProbe:
    """Forward hooks on every distinct decoder layer; records, in call order, the last
    position's input and output residual and its attention and MLP outputs."""

    def __init__(self, layers) -> None:
        self.records: list[dict[str, Any]] = []
        self._handles = []
        for layer in layers:
            self._handles += [
                layer.register_forward_pre_hook(self._enter, with_kwargs=True),
                layer.register_forward_hook(self._leave),
                layer.self_attn.register_forward_hook(self._part("attention")),
                layer.mlp.register_forward_hook(self._part("mlp")),
            ]

    @staticmethod
    def _last(tensor):
        return tensor[0, -1].detach().float().clone()

    def _enter(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.records.append({"h_in": self._last(hidden)})

    def _leave(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.records[-1]["h_out"] = self._last(hidden)

    def _part(self, name: str):
        def hook(module, args, output) -> None:
            self.records[-1][name] = self._last(output[0] if isinstance(output, tuple) else output)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def answer_token(tokenizer, example: Example) -> int:
    """The first token of the gold continuation (the prompt ends where the answer starts)."""
    return tokenizer(continuation(example.task, example.answer), add_special_tokens=False)[
        "input_ids"
    ][0]


def layer_stats(reference, records: list[dict[str, Any]], answer: int) -> list[dict[str, float]]:
    """Per executed layer: logit-lens hit and rank of `answer`, norms, update, attn/MLP ratio."""
    import torch

    model = reference.model
    outs = torch.stack([r["h_out"] for r in records])
    logits = model.lm_head(model.model.norm(outs))
    ranks = (logits > logits[:, answer : answer + 1]).sum(dim=1)
    rows = []
    for record, rank in zip(records, ranks.tolist(), strict=True):
        h_in, h_out = record["h_in"], record["h_out"]
        rows.append(
            {
                "lens_hit": float(rank == 0),
                "lens_rank": float(rank + 1),
                "residual_norm": float(h_out.norm()),
                "relative_update": float((h_out - h_in).norm() / h_in.norm()),
                "attn_mlp_ratio": float(record["attention"].norm() / record["mlp"].norm()),
            }
        )
    return rows


def curve(plan, loops: int, per_prompt: list[list[dict[str, float]]]) -> dict[str, Any]:
    """Per-layer aggregate over prompts: hit share, median rank, mean of the rest."""
    depth = len(per_prompt[0])
    size = plan.block_size
    passes = [(plan.start + j * size + 1, plan.start + (j + 1) * size) for j in range(loops)]

    def column(key: str) -> list[list[float]]:
        return [[p[i][key] for p in per_prompt] for i in range(depth)]

    return {
        "loops": loops,
        "depth": depth,
        "layers": plan.executed_layers(loops),
        "passes": passes,
        "lens_accuracy": [statistics.fmean(v) for v in column("lens_hit")],
        "lens_rank": [statistics.median(v) for v in column("lens_rank")],
        "residual_norm": [statistics.fmean(v) for v in column("residual_norm")],
        "relative_update": [statistics.fmean(v) for v in column("relative_update")],
        "attn_mlp_ratio": [statistics.fmean(v) for v in column("attn_mlp_ratio")],
    }


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from loopserve.server.engine import read_hf_config
    from loopserve.server.loop_plan import LoopPlan, parse_block
    from loopserve.server.reference import UnrolledReference

    path = model_path_of(args.model)
    block = parse_block(args.loop_block) if args.loop_block else None
    num_layers = read_hf_config(path)["num_hidden_layers"]
    plan = LoopPlan.for_model(num_layers, block, max_loops=max(args.loops))
    examples = suite_examples(args.tasks, args.n, args.shots, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = UnrolledReference(path, plan)
    probe = LayerProbe(reference.model.model.layers)
    prompts = [{"task": ex.task, "answer": ex.answer, "final_rank": {}} for ex in examples]
    curves = []
    try:
        for k in args.loops:
            per_prompt = []
            for example, record in zip(examples, prompts, strict=True):
                ids = tokenizer(example.prompt)["input_ids"]
                probe.records.clear()
                with torch.inference_mode():
                    reference.logits(ids, k)
                    stats = layer_stats(reference, probe.records, answer_token(tokenizer, example))
                per_prompt.append(stats)
                record["final_rank"][k] = stats[-1]["lens_rank"]
            curves.append(curve(plan, k, per_prompt))
    finally:
        probe.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_path": path,
        "loop_plan": plan.to_dict(),
        "loops": args.loops,
        "tasks": args.tasks,
        "n": args.n,
        "shots": args.shots,
        "seed": args.seed,
        "dtype": "float32 (unrolled transformers reference)",
    }
    data = {"config": config, "curves": curves, "prompts": prompts}
    report.write_json(out / "diagnose.json", data)
    heading = (
        f"{Path(path).name}: loop block {plan.start}:{plan.end}, fp32 unrolled reference, "
        f"{len(examples)} prompts ({', '.join(args.tasks)}); last prompt position"
    )
    plots.plot_diagnose(out / "diagnose.png", curves, heading)
    summary = [
        {
            "loops": c["loops"],
            "depth": c["depth"],
            "final_lens_accuracy": c["lens_accuracy"][-1],
            "final_median_rank": c["lens_rank"][-1],
            "final_residual_norm": c["residual_norm"][-1],
        }
        for c in curves
    ]
    print(report.format_table(summary, list(summary[0])))
    print(f"wrote {out / 'diagnose.json'}, diagnose.png", file=sys.stderr)
    return 0
