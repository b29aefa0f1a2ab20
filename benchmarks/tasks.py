"""Reasoning-primitive task suite for the accuracy-vs-loops benchmark.

Synthetic k-shot probes after MIDAS (Saunshi et al., 2024) and looped transformers (Saunshi et
al., 2025): variable assignment at alias depth 0/1/2, induction copying and one-step arithmetic.
The `_matched` assignment tasks show the same nine statements at every depth, so a fall with
depth there is not a fall with prompt length. They isolate the primitives that extra loop
iterations are supposed to buy, have one-token answers scored by exact match, and are generated
from a seed (stdlib only), so every loop count is measured on identical items without downloads.

The `iterate` family (`ITERATE_TASKS`, outside `TASKS`, the text suite) is for the looped
reference model, trained on it: zero-shot items ``S3 > > =`` of the iterated map in
`iterated_map`, one task per range of step counts. Its items are finite, so a task holds each
(start, steps) item at most once, in a seeded order, whatever ``n`` asks for.

Prompt layout: ``shots`` solved items, then the open item, joined by ``"\\n"`` (one-line items)
or ``"\\n\\n"`` (code items). A solved item is the open item plus its answer, glued without a
space where that reads naturally (``u=3``, ``3+4=7``) and with one space otherwise
(``v = 3``, ``... the cat``). Prompts never end in whitespace, because a trailing space splits
tokens unnaturally for BPE tokenizers; the model generates the space itself and `score` strips it.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from loopserve.benchmarks import iterated_map

__all__ = [
    "ITERATE_TASKS",
    "TASKS",
    "WORDS",
    "Example",
    "continuation",
    "family",
    "generate",
    "guess_baseline",
    "load_dataset",
    "max_answer_tokens",
    "parse_answer",
    "score",
    "solve",
]

_LETTERS = tuple(string.ascii_lowercase)
_DIGITS = tuple(string.digits)

# Fixed vocabulary for copy_words: common, short, distinct, lowercase English words.
_WORDS_TEXT = """
    cat dog sun moon tree book fish bird milk cake ball door hand foot head home city road rain
    snow wind fire lake hill star ship boat car bus train bike shoe hat coat shirt bed chair table
    lamp cup bowl spoon fork knife plate bread rice egg apple pear lemon grape corn bean salt sugar
    tea juice water stone sand gold iron wood paper glass box bag key lock clock phone king queen
    baby girl boy man woman friend mother father sister brother teacher doctor farmer horse cow pig
    sheep goat duck mouse lion tiger bear wolf fox frog snake bee ant river sea island forest field
    garden farm park school town shop bank room wall floor roof window bridge tower house red blue
    green black white brown pink gray big small tall short long old new young hot cold warm cool
    fast slow happy sad good bad kind dark light soft hard run walk jump swim sing read write draw
    play eat drink sleep talk laugh cry open close push pull give take find keep send bring buy
    sell cook wash clean build fly sit stand song game story music night morning day week year
    money letter picture color word name
"""
WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())

_SEQ_MIN, _SEQ_MAX = 8, 12  # induction sequence length, as in the induction-head probes
_D0_VARS = 5
_D1_BASES, _D1_ALIASES = 4, 3
_D2_CHAINS = 3  # one queried chain plus distractor chains of the same length


@dataclass(frozen=True)
class Example:
    """One benchmark item: the prompt ends exactly where the gold answer must start."""

    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class _Spec:
    """How a task's items are made and laid out; kept private so callers depend only on text."""

    make: Callable[[random.Random], tuple[str, str]] | None  # rng -> (open item, answer)
    item_sep: str  # between items of a prompt
    answer_sep: str  # between an item and its answer in a solved shot
    max_tokens: int  # answer tokens plus one to observe the boundary after it
    kind: str  # solver family: "assign", "copy", "arith" or "iterate"
    family: str  # group for the headline mean and the plot panels
    answer_format: str  # regex an answer of the right form matches (digit, letter, word)
    items: Callable[[], list[tuple[str, str]]] | None = None  # a finite zero-shot task's items


# ---------------------------------------------------------------- item generators


def _render_assign(stmts: list[tuple[str, str]], query: str, code: bool) -> str:
    """Math style ``a=1, b=a, b=``; code style one ``a = 1`` per line ending ``b =``."""
    if code:
        return "\n".join([f"{lhs} = {rhs}" for lhs, rhs in stmts] + [f"{query} ="])
    return ", ".join([f"{lhs}={rhs}" for lhs, rhs in stmts] + [f"{query}="])


def _assign_d0(rng: random.Random) -> tuple[list[tuple[str, str]], str, str]:
    """Distinct variables with digit values (repeats allowed); query one of them."""
    names = rng.sample(_LETTERS, _D0_VARS)
    stmts = [(name, rng.choice(_DIGITS)) for name in names]
    query = rng.choice(names)
    return stmts, query, dict(stmts)[query]


def _assign_d1(rng: random.Random) -> tuple[list[tuple[str, str]], str, str]:
    """Base variables with distinct digits plus aliases of bases; query an alias (one hop)."""
    names = rng.sample(_LETTERS, _D1_BASES + _D1_ALIASES)
    bases, aliases = names[:_D1_BASES], names[_D1_BASES:]
    values = dict(zip(bases, rng.sample(_DIGITS, _D1_BASES), strict=True))
    targets = {alias: rng.choice(bases) for alias in aliases}
    stmts = list(values.items()) + list(targets.items())
    rng.shuffle(stmts)
    query = rng.choice(aliases)
    return stmts, query, values[targets[query]]


def _assign_chains(depth: int) -> Callable[[random.Random], tuple[list[tuple[str, str]], str, str]]:
    """Chains top -> mid -> base -> digit; chain 0's name at `depth` hops is queried.

    Every depth shows the same nine statements (three chains), so depths 0, 1 and 2 differ
    only in how many hops the query needs, not in prompt length or distractors. Base digits
    are distinct so that following the wrong chain always gives a wrong answer.
    """

    def make(rng: random.Random) -> tuple[list[tuple[str, str]], str, str]:
        names = rng.sample(_LETTERS, 3 * _D2_CHAINS)
        values = rng.sample(_DIGITS, _D2_CHAINS)
        stmts: list[tuple[str, str]] = []
        for i, value in enumerate(values):
            base, mid, top = names[3 * i : 3 * i + 3]
            stmts += [(base, value), (mid, base), (top, mid)]
        rng.shuffle(stmts)
        return stmts, names[depth], values[0]

    return make


def _assign_task(
    depth_gen: Callable[[random.Random], tuple[list[tuple[str, str]], str, str]], code: bool
) -> Callable[[random.Random], tuple[str, str]]:
    def make(rng: random.Random) -> tuple[str, str]:
        stmts, query, answer = depth_gen(rng)
        return _render_assign(stmts, query, code), answer

    return make


def _copy_task(vocab: tuple[str, ...]) -> Callable[[random.Random], tuple[str, str]]:
    """Distinct tokens then a cut-off repeat from the start: the next token is unambiguous."""

    def make(rng: random.Random) -> tuple[str, str]:
        seq = rng.sample(vocab, rng.randint(_SEQ_MIN, _SEQ_MAX))
        cut = rng.randint(1, len(seq) - 1)
        return " ".join(seq + seq[:cut]), seq[cut]

    return make


# All (a, op, b) with a, b in 0..9 whose result is a single digit; sampled uniformly.
_ARITH = tuple(
    (a, op, b)
    for a in range(10)
    for b in range(10)
    for op in "+-"
    if 0 <= (a + b if op == "+" else a - b) <= 9
)


def _preschool(rng: random.Random) -> tuple[str, str]:
    a, op, b = rng.choice(_ARITH)
    return f"{a}{op}{b}=", str(a + b if op == "+" else a - b)


_DIGIT, _LETTER, _WORD = r"\d", r"[a-z]", r"[a-z]+"


def _assign_spec(depth_gen: Callable, code: bool, family: str) -> _Spec:
    item_sep, answer_sep, max_tokens = ("\n\n", " ", 3) if code else ("\n", "", 2)
    make = _assign_task(depth_gen, code)
    return _Spec(make, item_sep, answer_sep, max_tokens, "assign", family, _DIGIT)


_SPECS: dict[str, _Spec] = {
    "var_assign_d0_math": _assign_spec(_assign_d0, False, "var_assign"),
    "var_assign_d0_code": _assign_spec(_assign_d0, True, "var_assign"),
    "var_assign_d1_math": _assign_spec(_assign_d1, False, "var_assign"),
    "var_assign_d1_code": _assign_spec(_assign_d1, True, "var_assign"),
    "var_assign_d2_math": _assign_spec(_assign_chains(2), False, "var_assign"),
    "var_assign_d2_code": _assign_spec(_assign_chains(2), True, "var_assign"),
    # Length-matched: nine statements at every depth (three chains), only the query moves.
    **{
        f"var_assign_d{depth}_{style}_matched": _assign_spec(
            _assign_chains(depth), style == "code", "var_assign_matched"
        )
        for depth in (0, 1, 2)
        for style in ("math", "code")
    },
    "induction_copy": _Spec(_copy_task(_LETTERS), "\n", " ", 3, "copy", "copy", _LETTER),
    "copy_words": _Spec(_copy_task(WORDS), "\n", " ", 5, "copy", "copy", _WORD),
    "preschool_math": _Spec(_preschool, "\n", "", 2, "arith", "arith", _DIGIT),
}

TASKS: tuple[str, ...] = tuple(_SPECS)


def _iterate_items(low: int, high: int) -> Callable[[], list[tuple[str, str]]]:
    """Every start symbol at every step count in `low..high`."""
    f = iterated_map.permutation()

    def items() -> list[tuple[str, str]]:
        return [
            (iterated_map.prompt(start, steps), iterated_map.answer(f, start, steps))
            for steps in range(low, high + 1)
            for start in range(iterated_map.NUM_SYMBOLS)
        ]

    return items


# Step ranges: one pass suffices, the trained range needing more passes, beyond training.
_ITERATE_SPECS: dict[str, _Spec] = {
    f"iterate_n{low}_{high}": _Spec(
        None, "\n", " ", 1, "iterate", "iterate", r"S1[0-5]|S\d", _iterate_items(low, high)
    )
    for low, high in ((0, 3), (4, 7), (8, 10), (11, 13), (14, 16))
}
ITERATE_TASKS: tuple[str, ...] = tuple(_ITERATE_SPECS)
_ALL_SPECS = {**_SPECS, **_ITERATE_SPECS}

# Generation budget for tasks not in TASKS (e.g. from load_dataset), whose answers are unknown.
_DEFAULT_MAX_TOKENS = 8


def _spec(task: str) -> _Spec:
    try:
        return _ALL_SPECS[task]
    except KeyError:
        valid = ", ".join(TASKS + ITERATE_TASKS)
        raise ValueError(f"unknown task {task!r}; valid tasks: {valid}") from None


# ---------------------------------------------------------------- public API


def generate(task: str, n: int, *, shots: int = 5, seed: int = 0) -> list[Example]:
    """Make ``n`` k-shot examples; one seeded stream per (task, seed), so lists are reproducible.

    The stream is consumed in order, so ``generate(t, 10)`` is a prefix of ``generate(t, 20)``.
    An `iterate` task is zero-shot (``shots`` does not apply) and stops at its distinct items.
    """
    spec = _spec(task)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    # A str seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"loopserve.tasks:{task}:{seed}")
    if spec.items is not None:
        pool = spec.items()
        rng.shuffle(pool)
        return [Example(task, text, answer) for text, answer in pool[:n]]
    examples = []
    for _ in range(n):
        items = [spec.make(rng) for _ in range(shots + 1)]
        solved = [f"{text}{spec.answer_sep}{answer}" for text, answer in items[:-1]]
        open_text, answer = items[-1]
        examples.append(Example(task, spec.item_sep.join([*solved, open_text]), answer))
    return examples


_STMT = re.compile(r"([a-z])\s*=\s*([a-z0-9]?)")
_ARITH_ITEM = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=")


def _solve_assign(item: str) -> str:
    """Parse ``x=...`` statements (comma- or line-separated), then follow the query's chain."""
    parts = [p.strip() for p in re.split(r"[,\n]", item) if p.strip()]
    bindings: dict[str, str] = {}
    for part in parts[:-1]:
        m = _STMT.fullmatch(part)
        if not m or not m.group(2):
            raise ValueError(f"cannot parse assignment {part!r}")
        if m.group(1) in bindings:
            raise ValueError(f"variable {m.group(1)!r} assigned twice")
        bindings[m.group(1)] = m.group(2)
    m = _STMT.fullmatch(parts[-1]) if parts else None
    if not m or m.group(2):
        raise ValueError(f"last item has no open query: {item!r}")
    path = [m.group(1)]
    while not path[-1].isdigit():
        nxt = bindings.get(path[-1])
        if nxt is None:
            raise ValueError(f"variable {path[-1]!r} is never assigned")
        if nxt in path:
            raise ValueError(f"cyclic assignment through {nxt!r}")
        path.append(nxt)
    return path[-1]


def _solve_copy(item: str) -> str:
    """The smallest period p with tokens[p:] == tokens[:-p] fixes the repeat; continue it."""
    tokens = item.split()
    total = len(tokens)
    for period in range(1, total):
        if tokens[period:] == tokens[: total - period]:
            return tokens[total - period]
    raise ValueError(f"no repeated prefix in {item!r}")


def _solve_arith(item: str) -> str:
    m = _ARITH_ITEM.fullmatch(item.strip())
    if not m:
        raise ValueError(f"cannot parse arithmetic item {item!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _solve_iterate(item: str) -> str:
    """Count the step marks after the start symbol and apply the task's permutation."""
    words = item.split()
    if len(words) < 2 or words[0] not in iterated_map.SYMBOLS or words[-1] != iterated_map.ASK:
        raise ValueError(f"cannot parse iterate item {item!r}")
    if set(words[1:-1]) - {iterated_map.STEP}:
        raise ValueError(f"only step marks may follow the start symbol: {item!r}")
    start = iterated_map.SYMBOLS.index(words[0])
    return iterated_map.answer(iterated_map.permutation(), start, len(words) - 2)


_SOLVERS: dict[str, Callable[[str], str]] = {
    "assign": _solve_assign,
    "copy": _solve_copy,
    "arith": _solve_arith,
    "iterate": _solve_iterate,
}


def solve(task: str, prompt: str) -> str:
    """Re-derive the open item's answer from the prompt text alone, as an oracle for tests.

    Only the layout (item separator) is shared with the generator; the answer is recomputed by
    parsing: resolving assignments, finding the repeated prefix, or evaluating the arithmetic.
    """
    spec = _spec(task)
    return _SOLVERS[spec.kind](prompt.split(spec.item_sep)[-1])


def score(completion: str, answer: str) -> bool:
    """Exact match of a greedy continuation, so ``3`` accepts ``3,`` or ``3\\n`` but not ``35``.

    Leading whitespace is ignored because the model generates the space before words itself.
    """
    gold = answer.strip()
    text = completion.lstrip()
    if not gold or not text.startswith(gold):
        return False
    rest = text[len(gold) :]
    return not rest or not rest[0].isalnum()


def family(task: str) -> str:
    """The task's group (var_assign, var_assign_matched, copy, arith, iterate); a dataset task is
    its own."""
    spec = _ALL_SPECS.get(task)
    return spec.family if spec else task


def parse_answer(task: str, completion: str) -> str | None:
    """The answer the completion gives, if it has the answer's form (a digit, a letter, a word).

    None means a format failure (no digit where a digit belongs, "35" for one digit), which is
    not the same failure as a wrong digit. Tasks outside TASKS take the first whitespace-free
    run of word characters. Agrees with `score`: correct iff the parsed answer is the gold one.
    """
    spec = _ALL_SPECS.get(task)
    text = completion.lstrip()
    match = re.match(spec.answer_format if spec else r"\w+", text)
    if not match or text[match.end() : match.end() + 1].isalnum():
        return None
    return match.group()


def guess_baseline(example: Example) -> float | None:
    """Expected accuracy of guessing uniformly among the values the open item shows.

    Assignments: the distinct digits in the item; copying: the distinct tokens in the item;
    arithmetic: the ten digits; iterate: the 16 symbols. None for tasks outside the suite, whose
    answers have no known form.
    """
    spec = _ALL_SPECS.get(example.task)
    if spec is None:
        return None
    if spec.kind == "iterate":
        return 1 / iterated_map.NUM_SYMBOLS
    item = example.prompt.split(spec.item_sep)[-1]
    if spec.kind == "assign":
        candidates = set(re.findall(r"\d", item))
    elif spec.kind == "copy":
        candidates = set(item.split())
    else:
        candidates = set(_DIGITS)
    return 1 / len(candidates) if example.answer in candidates else 0.0


def continuation(task: str, answer: str) -> str:
    """The gold text right after the prompt (``" cat"`` for word tasks, ``"3"`` after ``=``)."""
    spec = _ALL_SPECS.get(task)
    return spec.answer_sep + answer if spec else answer


def load_dataset(path: str | os.PathLike[str]) -> list[Example]:
    """Read external items from JSONL ``{"prompt", "answer"[, "task"]}``; blank lines skipped.

    Errors name the line so a bad file is fixed before a long benchmark run, not during it.
    """
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in ("prompt", "answer"):
                if key not in record:
                    raise ValueError(f"{where}: missing key {key!r}")
            record.setdefault("task", "dataset")
            for key in ("prompt", "answer", "task"):
                if not isinstance(record[key], str):
                    kind = type(record[key]).__name__
                    raise ValueError(f"{where}: {key!r} must be a string, got {kind}")
            examples.append(Example(record["task"], record["prompt"], record["answer"]))
    return examples


def max_answer_tokens(task: str) -> int:
    """Tokens to generate: the answer (with its leading space) plus one to see the boundary.

    Names outside the suite (e.g. from load_dataset) get a generous default of 8 rather than an
    error. An `iterate` answer is one word of a word-level vocabulary: its token ends it.
    """
    spec = _ALL_SPECS.get(task)
    return spec.max_tokens if spec else _DEFAULT_MAX_TOKENS
