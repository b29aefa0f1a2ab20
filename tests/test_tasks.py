"""Tests for the reasoning-primitive task suite: answers, layout, scoring and dataset loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loopserve.benchmarks import tasks
from loopserve.benchmarks.tasks import (
    TASKS,
    WORDS,
    Example,
    continuation,
    family,
    generate,
    guess_baseline,
    load_dataset,
    max_answer_tokens,
    parse_answer,
    score,
    solve,
)

ASSIGN_TASKS = [t for t in TASKS if t.startswith("var_assign_")]
DEPTH = {t: int(t.split("_")[2][1]) for t in ASSIGN_TASKS}  # var_assign_d<k>_...


def is_code(task: str) -> bool:
    return "_code" in task


def item_sep(task: str) -> str:
    return "\n\n" if is_code(task) else "\n"


def spaced(task: str) -> bool:
    """Whether a shot's answer follows its item after one space (else glued to "=")."""
    return is_code(task) or task in ("induction_copy", "copy_words")


def items(task: str, prompt: str) -> list[str]:
    return prompt.split(item_sep(task))


def parse_assign(task: str, item: str) -> tuple[list[tuple[str, str]], str]:
    """Test-side parser in the exact documented layout: (statements, query)."""
    if is_code(task):
        *lines, last = item.split("\n")
        stmts = [tuple(line.split(" = ")) for line in lines]
        assert re.fullmatch(r"[a-z] =", last), last
        return stmts, last[0]
    *parts, last = item.split(", ")
    stmts = [tuple(part.split("=")) for part in parts]
    assert re.fullmatch(r"[a-z]=", last), last
    return stmts, last[0]


def chain(stmts: list[tuple[str, str]], var: str) -> list[str]:
    env = dict(stmts)
    path = [var]
    while not path[-1].isdigit():
        path.append(env[path[-1]])
    return path


# ---------------------------------------------------------------- generation


def test_task_names() -> None:
    expected = {
        "var_assign_d0_math",
        "var_assign_d0_code",
        "var_assign_d1_math",
        "var_assign_d1_code",
        "var_assign_d2_math",
        "var_assign_d2_code",
        "induction_copy",
        "copy_words",
        "preschool_math",
    } | {f"var_assign_d{d}_{s}_matched" for d in (0, 1, 2) for s in ("math", "code")}
    assert expected <= set(TASKS)
    assert len(set(TASKS)) == len(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_determinism_and_counts(task: str) -> None:
    a = generate(task, 20, seed=3)
    assert a == generate(task, 20, seed=3)
    assert len(a) == 20 and all(isinstance(ex, Example) and ex.task == task for ex in a)
    assert a != generate(task, 20, seed=4)
    assert generate(task, 5, seed=3) == a[:5]
    assert generate(task, 0) == []
    assert len({ex.prompt for ex in a}) == 20


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"var_assign_d0_math.*preschool_math"):
        generate("nope", 1)
    with pytest.raises(ValueError, match="n must be"):
        generate("copy_words", -1)
    with pytest.raises(ValueError, match="shots must be"):
        generate("copy_words", 1, shots=-1)
    with pytest.raises(ValueError, match="unknown task"):
        solve("nope", "a=1, a=")


@pytest.mark.parametrize("task", TASKS)
def test_solver_rederives_answers(task: str) -> None:
    for ex in generate(task, 200, seed=11):
        assert solve(task, ex.prompt) == ex.answer, ex.prompt
    for shots in (0, 1, 2):
        for ex in generate(task, 20, shots=shots, seed=5):
            assert solve(task, ex.prompt) == ex.answer


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("shots", [0, 1, 5])
def test_shot_layout(task: str, shots: int) -> None:
    for ex in generate(task, 30, shots=shots, seed=2):
        parts = items(task, ex.prompt)
        assert len(parts) == shots + 1
        assert all(p.strip() == p and p for p in parts), ex.prompt  # no stray blank lines
        assert ex.prompt == ex.prompt.rstrip()  # the model generates any leading space
        # ~150 tokens at most; copy_words keeps induction_copy's 8-12 tokens, so runs longer
        assert len(ex.prompt) < (800 if task == "copy_words" else 400)


@pytest.mark.parametrize("task", TASKS)
def test_shots_show_their_own_answers(task: str) -> None:
    """Cutting a shot just before its answer yields an item the solver answers the same way."""
    for ex in generate(task, 50, seed=9):
        for shot in items(task, ex.prompt)[:-1]:
            if spaced(task):
                head, _, ans = shot.rpartition(" ")
            else:  # digit answers glued to "=" with no space
                head, ans = shot[:-1], shot[-1]
            assert solve(task, head) == ans, shot


@pytest.mark.parametrize("task", ASSIGN_TASKS)
def test_assign_structure(task: str) -> None:
    depth = DEPTH[task]
    for ex in generate(task, 200, seed=7):
        for k, item in enumerate(items(task, ex.prompt)):
            if k < len(items(task, ex.prompt)) - 1:  # strip a shot's answer to reopen it
                item = item[:-2] if is_code(task) else item[:-1]
            stmts, query = parse_assign(task, item)
            names = [lhs for lhs, _ in stmts]
            assert len(names) == len(set(names)), item
            assert all(re.fullmatch(r"[a-z]", n) for n in names)
            assert all(re.fullmatch(r"[a-z0-9]", rhs) for _, rhs in stmts)
            path = chain(stmts, query)
            assert len(path) == depth + 2, (item, path)  # query, depth aliases, base, digit
            depths = {n: len(chain(stmts, n)) - 2 for n in names}
            if task.endswith("_matched") or depth == 2:  # three chains, the query at `depth`
                assert sorted(depths.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
                tops = [n for n in names if depths[n] == depth]
                assert query in tops
                assert len({chain(stmts, t)[-1] for t in tops}) == 3  # distractors differ
            elif depth == 0:
                assert len(stmts) == 5 and set(depths.values()) == {0}
            elif depth == 1:
                assert sorted(depths.values()) == [0, 0, 0, 0, 1, 1, 1]
                bases = [n for n in names if depths[n] == 0]
                assert len({dict(stmts)[b] for b in bases}) == 4  # distinct base digits
        assert re.fullmatch(r"\d", ex.answer)


def test_matched_depths_differ_only_in_the_query() -> None:
    """Same statement count, prompt length and guessing odds at depth 0, 1 and 2."""
    for style in ("math", "code"):
        lengths = {}
        for depth in (0, 1, 2):
            examples = generate(f"var_assign_d{depth}_{style}_matched", 200, seed=3)
            lengths[depth] = sum(len(ex.prompt) for ex in examples) / len(examples)
            assert {guess_baseline(ex) for ex in examples} == {1 / 3}
        assert max(lengths.values()) - min(lengths.values()) < 1.0, lengths


@pytest.mark.parametrize("task", ["induction_copy", "copy_words"])
def test_copy_structure(task: str) -> None:
    vocab = set(WORDS) if task == "copy_words" else set("abcdefghijklmnopqrstuvwxyz")
    for ex in generate(task, 200, seed=4):
        tokens = items(task, ex.prompt)[-1].split()
        period = next(p for p in range(1, len(tokens)) if tokens[p] == tokens[0])
        seq = tokens[:period]
        assert 8 <= len(seq) <= 12 and len(set(seq)) == len(seq)
        assert 1 <= len(tokens) - period < len(seq)
        assert tokens[period:] == seq[: len(tokens) - period]
        assert set(tokens) <= vocab and ex.answer in vocab
        assert ex.answer == seq[len(tokens) - period]
    assert len(WORDS) >= 150 and len(set(WORDS)) == len(WORDS)
    assert all(re.fullmatch(r"[a-z]+", w) for w in WORDS)


def test_preschool_structure() -> None:
    for ex in generate("preschool_math", 200, seed=1):
        for line in ex.prompt.split("\n")[:-1]:
            assert re.fullmatch(r"\d[+-]\d=\d", line), line
        assert re.fullmatch(r"\d[+-]\d=", ex.prompt.split("\n")[-1])
        assert re.fullmatch(r"\d", ex.answer)


def test_solver_on_handwritten_prompts() -> None:
    assert solve("var_assign_d0_math", "u=3, d=3, a=2, x=1, i=8, u=") == "3"
    assert solve("var_assign_d1_math", "e=g, n=8, k=9, r=k, y=k, g=1, h=4, y=") == "9"
    assert solve("var_assign_d2_code", "a = 1\nb = 2\nc = a\nd = c\ne = b\nd =") == "1"
    assert solve("induction_copy", "x y\nq w e r t y u i q w e r") == "t"
    assert solve("copy_words", "cat dog sun cat dog") == "sun"
    assert solve("preschool_math", "1+1=2\n9-5=") == "4"
    for bad in ("a=b, b=a, a=", "a=1, b=", "a=1, a=2, a=", "a=1, b=2"):
        with pytest.raises(ValueError):
            solve("var_assign_d1_math", bad)
    with pytest.raises(ValueError):
        solve("induction_copy", "a b c d")


def test_max_answer_tokens() -> None:
    for task in TASKS:
        assert 1 <= max_answer_tokens(task) <= 8
    assert max_answer_tokens("copy_words") > max_answer_tokens("var_assign_d0_math")
    assert max_answer_tokens("dataset") == 8


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("completion", "answer", "ok"),
    [
        ("3", "3", True),
        ("3,", "3", True),
        ("3\n", "3", True),
        (" 3", "3", True),
        ("\n\t 3 and more", "3", True),
        ("35", "3", False),
        ("4", "3", False),
        ("", "3", False),
        ("   ", "3", False),
        (" 3", " 3", True),
        ("x", "", False),
        (" cat", "cat", True),
        (" cat.", "cat", True),
        (" cats", "cat", False),
        (" Cat", "cat", False),
        ("c", "cat", False),
        ("k\n\nm", "k", True),
    ],
)
def test_score(completion: str, answer: str, ok: bool) -> None:
    assert score(completion, answer) is ok


@pytest.mark.parametrize("task", TASKS)
def test_gold_continuations_score(task: str) -> None:
    """A model that continues the pattern exactly (answer, then the next item) scores."""
    for ex in generate(task, 20, seed=8):
        lead = " " if spaced(task) else ""
        assert score(lead + ex.answer + item_sep(task) + "x", ex.answer)
        assert not score(lead + ex.answer + "7q", ex.answer)


@pytest.mark.parametrize(
    ("task", "completion", "parsed"),
    [
        ("var_assign_d0_math", "3,", "3"),
        ("var_assign_d0_math", " 3\n", "3"),
        ("var_assign_d0_math", "35", None),
        ("var_assign_d0_math", "x", None),
        ("var_assign_d0_math", "", None),
        ("induction_copy", " q\n", "q"),
        ("induction_copy", " qu", None),
        ("copy_words", " cat.", "cat"),
        ("copy_words", " Cat", None),
        ("preschool_math", "7\n", "7"),
        ("dataset", " yes, and", "yes"),
    ],
)
def test_parse_answer(task: str, completion: str, parsed: str | None) -> None:
    assert parse_answer(task, completion) == parsed


@pytest.mark.parametrize("task", TASKS)
def test_parse_answer_agrees_with_score(task: str) -> None:
    for ex in generate(task, 20, seed=8):
        for text in (ex.answer, " " + ex.answer + ",", ex.answer + "7", "x", " 1", " the"):
            assert score(text, ex.answer) is (parse_answer(task, text) == ex.answer), text


def test_guess_baseline_counts_the_values_shown() -> None:
    d0 = Example("var_assign_d0_math", "u=3, d=3, a=2, x=1, i=8, u=", "3")
    assert guess_baseline(d0) == 1 / 4  # digits 3, 2, 1, 8
    copy = Example("induction_copy", "x y\nq w e q w", "e")
    assert guess_baseline(copy) == 1 / 3
    assert guess_baseline(Example("preschool_math", "2+2=", "4")) == 0.1
    assert guess_baseline(Example("dataset", "2+2=", "4")) is None
    assert family("var_assign_d1_code") == "var_assign"
    assert family("var_assign_d1_code_matched") == "var_assign_matched"
    assert family("copy_words") == "copy" and family("dataset") == "dataset"
    assert continuation("copy_words", "cat") == " cat"
    assert continuation("preschool_math", "4") == "4"


# ---------------------------------------------------------------- datasets


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_dataset_good(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            json.dumps({"prompt": "a=1, a=", "answer": "1"}),
            "",
            json.dumps({"prompt": "2+2=", "answer": "4", "task": "mine", "extra": 1}),
        ],
    )
    assert load_dataset(path) == [
        Example("dataset", "a=1, a=", "1"),
        Example("mine", "2+2=", "4"),
    ]
    assert load_dataset(str(path)) == load_dataset(path)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"prompt": "a", "answer": ', r"data\.jsonl:2: invalid JSON"),
        ('["prompt", "answer"]', r":2: expected a JSON object"),
        ('{"prompt": "a"}', r":2: missing key 'answer'"),
        ('{"answer": "a"}', r":2: missing key 'prompt'"),
        ('{"prompt": "a", "answer": 3}', r":2: 'answer' must be a string, got int"),
        ('{"prompt": null, "answer": "3"}', r":2: 'prompt' must be a string"),
        ('{"prompt": "a", "answer": "3", "task": 1}', r":2: 'task' must be a string"),
    ],
)
def test_load_dataset_errors(tmp_path: Path, bad: str, message: str) -> None:
    path = write(tmp_path, [json.dumps({"prompt": "x", "answer": "y"}), bad])
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_module_exports() -> None:
    assert set(tasks.__all__) >= {"TASKS", "Example", "generate", "solve", "score"}
