"""The looped reference model: a committed checkpoint trained to gain from loops.

Through the real HTTP server (`loopserve serve --model looped-reference`, no loop flags),
in fp32: accuracy that must rise with `loops` (a functional check no oracle written beside
the looping code can fake), exactness against the unrolled transformers reference up to
k = 16, and depths 1..16 in one batch equal to solo runs. One server for the module.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from loopserve.benchmarks import iterated_map
from loopserve.benchmarks.tasks import ITERATE_TASKS
from loopserve.server.default_model import REFERENCE_NAME, reference_model_path, resolve_model
from loopserve.server.engine import EngineConfig, build_plan
from loopserve.server.loop_plan import LoopPlan, plan_from_hf_config
from loopserve.server.reference import UnrolledReference

F = iterated_map.permutation()
PLAN = LoopPlan(num_layers=3, start=1, end=2, max_loops=20, default_loops=1)


def items(low: int, high: int) -> list[tuple[str, str]]:
    """(prompt, answer) for every start symbol at every step count in `low..high`."""
    return [
        (iterated_map.prompt(s, n), iterated_map.answer(F, s, n))
        for n in range(low, high + 1)
        for s in range(16)
    ]


@pytest.fixture(scope="module")
def reference() -> UnrolledReference:
    return UnrolledReference(str(reference_model_path()), PLAN)


# ---------------------------------------------------------------- the checkpoint, no engine


def test_names_resolve_to_the_embedded_checkpoints(model_path):
    """`--model looped-reference` needs no hub and no training; the plan travels inside."""
    path = Path(resolve_model(REFERENCE_NAME))
    assert path == reference_model_path() and path.parent.name == "models"
    config = json.loads((path / "config.json").read_text())
    assert plan_from_hf_config(config) == PLAN
    assert resolve_model(None) == resolve_model("SmolLM2-135M-Instruct") == model_path
    assert resolve_model("/some/checkpoint") == "/some/checkpoint"


def test_checkpoint_plan_is_the_default_and_flags_override_it():
    """Without this the reference would serve at the default 4-layer block (all 3 layers)."""
    config = json.loads((reference_model_path() / "config.json").read_text())
    assert build_plan(EngineConfig(), config) == PLAN
    assert build_plan(EngineConfig(max_loops=8, loop_block=(0, 2)), config) == LoopPlan(3, 0, 2, 8)
    assert build_plan(EngineConfig(), {**config, "loop_plan": None}) == LoopPlan.for_model(3)


def test_tokenizer_is_word_level_with_bos():
    """The served prompt must tokenize as in training: `<bos>` first, one token a word."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())
    vocab = tokenizer.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == list(iterated_map.VOCAB)
    assert tokenizer("S3 > > =").input_ids == [vocab[t] for t in ("<bos>", "S3", ">", ">", "=")]


def test_training_forward_is_the_unrolled_model(reference):
    """The trainer's forward (block run r times) must be what loopserve serves, or the
    checkpoint would have learned a different model from the one tested here."""
    from loopserve.benchmarks.train_looped_reference import answer_logits, encode

    starts, steps = torch.arange(16), torch.full((16,), 5)
    ids = encode(starts, steps, 8)
    for loops in (1, 4, 9):
        with torch.inference_mode():
            trained = answer_logits(reference.model, ids, 2 + steps, loops)
        unrolled = torch.stack([reference.logits(row.tolist(), loops)[7] for row in ids])
        torch.testing.assert_close(trained, unrolled)


def test_one_forward_checks_a_greedy_continuation(reference):
    """What the engine tests compare with: `greedy_choices` agrees with token-by-token
    greedy decoding, and a continuation that is not greedy differs from its choices."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())
    ids = tokenizer(iterated_map.prompt(3, 2)).input_ids
    for loops in (1, 3):
        want = reference.greedy(ids, loops, 4)
        assert reference.greedy_choices(ids, loops, want) == want
        wrong = [*want[:2], (want[2] + 1) % len(tokenizer), want[3]]
        assert reference.greedy_choices(ids, loops, wrong) != wrong


# ---------------------------------------------------------------- through the HTTP server


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from loopserve.server.launcher import start_server

    log = tmp_path_factory.mktemp("reference-server") / "server.log"
    options = ["--model", REFERENCE_NAME, "--dtype", "float32", "--enforce-eager"]
    server = start_server([*options, "--max-num-seqs", "128"], str(log))
    yield server.url
    server.stop()


def complete(url: str, prompts: list[str], loops: int, max_tokens: int = 1) -> list[dict]:
    """Greedy choices (text, token logprobs) in prompt order, from one request."""
    body = {
        "prompt": prompts,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
        "loops": loops,
    }
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return sorted(response.json()["choices"], key=lambda c: c["index"])


def accuracy(url: str, cases: list[tuple[str, str]], loops: int) -> float:
    choices = complete(url, [p for p, _ in cases], loops)
    return sum(c["text"].strip() == a for c, (_, a) in zip(choices, cases, strict=True)) / len(
        cases
    )


@pytest.mark.slow
def test_served_with_the_checkpoints_plan(url):
    """Started with no loop flags, the server must loop the checkpoint's block up to 20."""
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["id"] == REFERENCE_NAME
    assert (card["num_layers"], card["loop_block"], card["max_loops"]) == (3, [1, 2], 20)
    assert card["default_loops"] == 1


@pytest.mark.slow
def test_accuracy_rises_with_loops(url):
    """Fails if `loops` does not reach the model (flat), or if a pass runs the wrong thing:
    sharing one KV plane across passes, skipping or repeating the wrong layers, or mixing
    rows' depths all break the trained computation and pull k=10 down."""
    hard = items(6, 10)
    assert accuracy(url, hard, 1) <= 0.3
    assert accuracy(url, hard, 10) >= 0.9
    hardest_trained = items(8, 10)  # the bar for the shipped checkpoint
    assert accuracy(url, hardest_trained, 1) <= 0.1
    assert accuracy(url, hardest_trained, 6) >= 0.95
    assert accuracy(url, items(0, 3), 16) >= 0.95  # extra passes keep easy items right


@pytest.mark.slow
def test_equals_unrolled_reference_up_to_16_loops(url, reference):
    """Greedy tokens and their logprobs, four tokens each, so decode steps read the KV of
    every (layer, pass) the prompt wrote."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())
    prompts = [iterated_map.prompt(3, 2), iterated_map.prompt(11, 9), iterated_map.prompt(0, 14)]
    for loops in (1, 2, 3, 5, 8, 12, 16):
        for prompt, choice in zip(prompts, complete(url, prompts, loops, 4), strict=True):
            ids = tokenizer(prompt).input_ids
            want = reference.greedy(ids, loops, 4)
            assert choice["logprobs"]["tokens"] == tokenizer.convert_ids_to_tokens(want)
            logits = reference.logits(ids + want, loops)[len(ids) - 1 : -1]
            want_logprobs = logits.log_softmax(-1).gather(1, torch.tensor(want)[:, None])
            got_logprobs = choice["logprobs"]["token_logprobs"]
            assert got_logprobs == pytest.approx(want_logprobs.flatten().tolist(), abs=1e-4)


@pytest.mark.slow
def test_mixed_depths_in_one_batch_equal_solo_runs(url):
    """Depths 1..16 in flight together: a row must not run, or read KV of, another's passes."""
    prompts = {k: iterated_map.prompt(k - 1, k) for k in range(1, 17)}

    def body(k: int, salt: str) -> dict:
        return {
            "prompt": prompts[k],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 1,
            "loops": k,
            "cache_salt": salt,
        }

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/completions", json=body(k, "mixed")) for k in prompts)
            )
        return [r.json()["choices"][0]["logprobs"] for r in responses]

    mixed = asyncio.run(together())
    for k, got in zip(prompts, mixed, strict=True):
        solo = httpx.post(f"{url}/v1/completions", json=body(k, "solo"), timeout=120)
        want = solo.json()["choices"][0]["logprobs"]
        assert got["tokens"] == want["tokens"], k
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4), k


@pytest.mark.slow
def test_bench_accuracy_on_the_iterate_family(url, tmp_path, capsys):
    """`bench accuracy --model looped-reference` picks the iterate family, passes its FLOPs
    probe on this model and writes rows in which depth pays."""
    from loopserve.server.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "accuracy", "--url", url, "--model", REFERENCE_NAME, "--loops", "1,6"]
    assert main([*argv, "--n", "16", "--out", str(out)]) == 0
    rows = json.loads((out / "accuracy.json").read_text())["rows"]
    cell = {(r["task"], r["loops"]): r for r in rows}
    assert {t for t, _ in cell} == {*ITERATE_TASKS, "mean"}
    assert cell["iterate_n8_10", 6]["accuracy"] > cell["iterate_n8_10", 1]["accuracy"] + 0.5
    assert cell["iterate_n8_10", 1]["guess_baseline"] == 1 / 16
    assert (out / "accuracy.png").stat().st_size > 0
