"""Train the looped reference model: a tiny Llama whose accuracy rises with `loops`.

    taskset -c 1 python -m loopserve.benchmarks.train_looped_reference --seed 0

Three decoder layers (prelude, a one-layer block, coda) trained on the iterated map of
`iterated_map`: each batch draws a pass count r in 1..10, runs the block r times and holds
only items with at most r steps, so the block learns to advance the map on every pass and
harder items need more passes. The training forward is the unrolled order loopserve
serves (prelude, block x r, coda, each pass attending over its own states), written with
the modules of a `transformers.LlamaForCausalLM` so the export loads 1:1 with the block
listed once. The export is a Hugging Face checkpoint with a word-level tokenizer and the
loop plan in its config, so `loopserve serve --model <dir>` loops it with no flags.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from loopserve.benchmarks import iterated_map as task
from loopserve.benchmarks.stats import wilson_interval
from loopserve.server.loop_plan import PLAN_CONFIG_KEY, LoopPlan

MAX_TRAIN_PASSES = 10
MAX_EVAL_STEPS = 16
EVAL_LOOPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
STEP_GROUPS = ((0, 3), (4, 7), (8, 10), (11, 13), (14, 16))
PLAN = LoopPlan(num_layers=3, start=1, end=2, max_loops=20, default_loops=1)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "server" / "models" / "looped-reference"
ASK_ID, STEP_ID, UNK_ID = (task.VOCAB.index(t) for t in (task.ASK, task.STEP, task.UNK))
SYMBOL_ID = task.VOCAB.index(task.SYMBOLS[0])


def build_model(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(task.VOCAB),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=PLAN.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,  # vLLM's CPU attention takes 32, not 16
        max_position_embeddings=64,
        bos_token_id=task.VOCAB.index(task.BOS),
        eos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    setattr(config, PLAN_CONFIG_KEY, PLAN.to_dict())
    return LlamaForCausalLM(config)


def build_tokenizer():
    """Whitespace-split word-level tokenizer over `iterated_map.VOCAB`, `<bos>` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(task.VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=task.UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{task.BOS} $A", special_tokens=[(task.BOS, vocab[task.BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=task.BOS, unk_token=task.UNK)


def answer_logits(model: nn.Module, ids: torch.Tensor, ask_at: torch.Tensor, loops: int):
    """Logits at each row's `=` with the block run `loops` times (loopserve's unrolled order)."""
    body = model.model
    hidden = body.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = body.rotary_emb(hidden, position_ids=positions)
    for index in PLAN.executed_layers(loops):
        # No mask: SDPA runs causal, and padding after `=` cannot reach it.
        hidden = body.layers[index](hidden, position_ids=positions, position_embeddings=rope)
    hidden = body.norm(hidden[torch.arange(ids.shape[0]), ask_at])
    return model.lm_head(hidden)


def encode(starts: torch.Tensor, steps: torch.Tensor, length: int) -> torch.Tensor:
    """`<bos> S{s} > ... > =` per row, right-padded to `length` with `<unk>`."""
    ids = torch.full((len(starts), length), UNK_ID)
    ids[:, 0] = task.VOCAB.index(task.BOS)
    ids[:, 1] = SYMBOL_ID + starts
    columns = torch.arange(length).unsqueeze(0)
    ids[(columns >= 2) & (columns < 2 + steps.unsqueeze(1))] = STEP_ID
    ids[torch.arange(len(starts)), 2 + steps] = ASK_ID
    return ids


def power_table(f: tuple[int, ...], max_steps: int) -> torch.Tensor:
    """[max_steps + 1, 16]: `f^n(s)`."""
    return torch.tensor(
        [[task.iterate(f, s, n) for s in range(task.NUM_SYMBOLS)] for n in range(max_steps + 1)]
    )


def train(model: nn.Module, seed: int, steps: int, batch: int, lr: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    powers = power_table(task.permutation(), MAX_TRAIN_PASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    model.train()
    bar = tqdm(range(steps), desc="train", mininterval=5)
    for _ in bar:
        passes = int(torch.randint(1, MAX_TRAIN_PASSES + 1, (), generator=generator))
        starts = torch.randint(0, task.NUM_SYMBOLS, (batch,), generator=generator)
        item_steps = torch.randint(0, passes + 1, (batch,), generator=generator)
        ids = encode(starts, item_steps, passes + 3)
        logits = answer_logits(model, ids, 2 + item_steps, passes)
        targets = SYMBOL_ID + powers[item_steps, starts]
        loss = nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        accuracy = (logits.argmax(-1) == targets).float().mean()
        bar.set_postfix(passes=passes, loss=f"{loss.item():.3f}", acc=f"{accuracy.item():.2f}")


@torch.inference_mode()
def accuracy_table(model: nn.Module) -> dict[tuple[int, int], int]:
    """Correct answers out of 16 (every start symbol) per (steps n, loops k), in fp32."""
    model.eval()
    powers = power_table(task.permutation(), MAX_EVAL_STEPS)
    starts = torch.arange(task.NUM_SYMBOLS)
    table = {}
    for n in range(MAX_EVAL_STEPS + 1):
        item_steps = torch.full_like(starts, n)
        ids = encode(starts, item_steps, n + 3)
        for k in EVAL_LOOPS:
            guess = answer_logits(model, ids, 2 + item_steps, k).argmax(-1) - SYMBOL_ID
            table[n, k] = int((guess == powers[n]).sum())
    return table


def format_table(table: dict[tuple[int, int], int]) -> str:
    """Accuracy by step group (rows) and loops (columns), with 95% Wilson intervals."""
    lines = ["steps n | " + " | ".join(f"k={k}" for k in EVAL_LOOPS)]
    for low, high in STEP_GROUPS:
        cells = []
        for k in EVAL_LOOPS:
            correct = sum(table[n, k] for n in range(low, high + 1))
            total = task.NUM_SYMBOLS * (high - low + 1)
            lo, hi = wilson_interval(correct, total)
            cells.append(f"{correct / total:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append(f"{low}-{high} | " + " | ".join(cells))
    return "\n".join(lines)


def export(model: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config._name_or_path = out.name
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batches")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder")
    args = parser.parse_args(argv)
    # One thread: bit-reproducible for a seed on one machine, and leaves other cores free.
    torch.set_num_threads(1)
    model = build_model(args.seed)
    began = time.monotonic()
    train(model, args.seed, args.steps, args.batch, args.lr)
    print(f"trained {args.steps} steps in {time.monotonic() - began:.0f} s (seed {args.seed})")
    export(model, args.out)
    print(f"checkpoint: {args.out}")
    print(format_table(accuracy_table(model)))


if __name__ == "__main__":
    main()
