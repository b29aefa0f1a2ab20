"""The iterated-map task the looped reference model is trained on (stdlib only).

A fixed single-cycle permutation `f` of the symbols `S0..S15`; the prompt `S{s}` followed by
`n` step marks `>` and `=` asks for `S{f^n(s)}`. The step marks are unary so that each block
pass can apply `f` a fixed number of times: a solver needs passes in proportion to `n`.
`f` is drawn from `TASK_SEED` here, for the trainer and the harness; the served checkpoint
carries it only in its weights.
"""

from __future__ import annotations

import random

NUM_SYMBOLS = 16
TASK_SEED = 0
BOS, ASK, STEP, UNK = "<bos>", "=", ">", "<unk>"
SYMBOLS: tuple[str, ...] = tuple(f"S{i}" for i in range(NUM_SYMBOLS))
# Token ids are positions here: <bos> = > S0..S15, then <unk> for any other word.
VOCAB: tuple[str, ...] = (BOS, ASK, STEP, *SYMBOLS, UNK)


def permutation(seed: int = TASK_SEED) -> tuple[int, ...]:
    """A single-cycle permutation (Sattolo's algorithm), so no start symbol is a fixed point
    and every `f^n` with `0 < n < 16` moves every symbol."""
    rng = random.Random(f"loopserve.iterated_map:{seed}")
    order = list(range(NUM_SYMBOLS))
    for i in range(NUM_SYMBOLS - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return tuple(order)


def iterate(f: tuple[int, ...], start: int, steps: int) -> int:
    """`f` applied `steps` times to `start`."""
    for _ in range(steps):
        start = f[start]
    return start


def prompt(start: int, steps: int) -> str:
    """The prompt text (the tokenizer prepends `<bos>`): `S3 > > =` for start 3, 2 steps."""
    return " ".join([SYMBOLS[start], *[STEP] * steps, ASK])


def answer(f: tuple[int, ...], start: int, steps: int) -> str:
    return SYMBOLS[iterate(f, start, steps)]
