"""`loopserve bench`: latency statistics, argument errors, and every command end to end.

The end-to-end tests run the real command in-process (`loopserve.server.cli.main`) against
the session's shared server (conftest `shared_server`); loads are tiny because only the
plumbing, the file formats and the cross-checks are under test here. `bench scan` starts a
server per block: its logic runs here on stubbed servers, for real in `make bench-smoke`.
Accuracy statistics: test_stats.py.
"""

from __future__ import annotations

import csv
import json
import math
import re

import httpx
import pytest
from conftest import SERVER_API_KEY as API_KEY
from conftest import SERVER_DEFAULT_LOOPS

from loopserve.benchmarks import report
from loopserve.server.cli import main

pytestmark = pytest.mark.slow

ROW_KEYS = {
    "task",
    "family",
    "guess_baseline",
    "format_ok_rate",
    "loops",
    "n",
    "correct",
    "accuracy",
    "ci95_low",
    "ci95_high",
    "flops_per_token",
    "mean_context_tokens",
}
METRICS = [
    f"{stat}_{name}_ms"
    for name in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "p90", "p99")
]


# ---------------------------------------------------------------- pure parts


def test_latency_stats_match_numbers_worked_by_hand():
    stats = report.latency_stats("ttft", [0.003, 0.001, 0.002, 0.004])
    assert stats["mean_ttft_ms"] == pytest.approx(2.5)
    assert stats["std_ttft_ms"] == pytest.approx(math.sqrt(1.25))  # population std
    assert stats["median_ttft_ms"] == pytest.approx(2.5)
    assert stats["p90_ttft_ms"] == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
    assert stats["p99_ttft_ms"] == pytest.approx(3.97)
    assert set(report.latency_stats("itl", []).values()) == {None}


def vllm_result(loops: list[int]) -> dict:
    """What vLLM's `benchmark` returns per request, for requests at `loops` (one failed)."""
    n = len(loops)
    return {
        "errors": ["", "", "", "HTTP 500"][:n],
        "input_lens": [16] * n,
        "output_lens": [5, 5, 2, 0][:n],
        "ttfts": [0.1, 0.2, 0.3, 0.0][:n],
        "latencies": [0.5, 1.0, 0.4, 0.0][:n],
        "itls": [[0.1] * 4, [0.2] * 4, [0.1], []][:n],
    }


def test_a_mixed_load_reports_each_loop_count_and_its_flops():
    from loopserve.benchmarks.serve import Load, by_loops, request_flops
    from loopserve.server.flops import FlopsModel, ModelShape
    from loopserve.server.loop_plan import LoopPlan

    loops = [1, 2, 1, 2]
    load = Load("mixed", [], loops)
    result = vllm_result(loops)
    metrics = by_loops(load, result)
    assert {k: m["completed"] for k, m in metrics.items()} == {"1": 2, "2": 1}
    assert metrics["2"]["median_tpot_ms"] == pytest.approx(200.0)  # (1.0 - 0.2) / (5 - 1)
    assert metrics["1"]["median_tpot_ms"] == pytest.approx(100.0)  # (0.4 - 0.3) / 1 and 0.1
    assert metrics["1"]["median_ttft_ms"] == pytest.approx(200.0)  # 0.1 and 0.3
    shape = ModelShape(64, 2, 2, 32, 128, 1000)
    flops = FlopsModel(shape, LoopPlan.for_model(8))
    billed = request_flops(load, result, flops)
    assert billed[3] is None  # the failed request
    assert billed[:3] == [sum(flops.request(k, 16, n)) for k, n in ((1, 5), (2, 5), (1, 2))]
    assert billed[1] > billed[0]


def test_loads_share_prompts_and_the_mixed_load_cycles_its_loop_counts(tokenizer):
    from argparse import Namespace

    from loopserve.benchmarks.serve import plan_loads

    args = Namespace(num_prompts=5, input_len=16, output_len=4, seed=0, loops=[1, 3], mixed=True)
    loads = plan_loads(args, tokenizer)
    assert [(load.label, load.loops) for load in loads] == [
        ("loops=1", 1),
        ("loops=3", 3),
        ("mixed", [1, 3, 1, 3, 1]),
    ]
    assert loads[0].requests == loads[1].requests
    assert {r.prompt_len for r in loads[0].requests} == {16}
    fixed = {r.prompt for r in loads[0].requests}
    assert not fixed & {r.prompt for r in loads[2].requests}  # no KV from the fixed loads


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["accuracy", "--loops", "0"], "loop counts must be >= 1, got 0"),
        (["accuracy", "--loops", "1,x"], "loop counts must be integers"),
        (["accuracy", "--tasks", "nope"], "unknown task(s) nope"),
        (["accuracy", "--n", "0"], "expected an integer >= 1"),
        (["scan", "--blocks", "13-17"], "loop block must look like START:END"),
        (["scan", "--blocks", "5:5"], "needs 0 <= START < END"),
        (["lm-eval"], "the following arguments are required: --tasks"),
        (["serve", "--input-len", "-3"], "expected an integer >= 1"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_dataset_fails_before_starting_a_server(tmp_path, capsys):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"prompt": "1+1="}\n')
    assert main(["bench", "accuracy", "--dataset", str(dataset), "--out", str(tmp_path)]) == 2
    assert "missing key 'answer'" in capsys.readouterr().err
    assert not (tmp_path / "server.log").exists()


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's server, at default depth 3, which no `bench serve` load here asks for:
    a request sent without `loops` (the baseline's) shows in its metrics as loops="3"."""
    return shared_server


def test_billed_flops_equal_torchs_count_on_the_reference_at_1024_tokens(server, model_path):
    """At 1041 tokens attention is ~12% of the FLOPs (2% at 64), so a wrong attention term fails."""
    from loopserve.benchmarks.accuracy import flops_model
    from loopserve.benchmarks.cli import model_card
    from loopserve.benchmarks.flops_check import checkpoint_config, counted_flops

    plan = flops_model(model_card(server.url, API_KEY), model_path).plan
    body = {"prompt": "a b " * 520, "max_tokens": 3, "temperature": 0.0, "loops": 3}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=300)
    usage = response.json()["usage"]
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    assert tokens >= 1024
    assert usage["total_flops"] == counted_flops(checkpoint_config(model_path), plan, 3, tokens)


def read_rows(out) -> list[dict]:
    data = json.loads((out / "accuracy.json").read_text())
    assert data["config"]["loop_plan"]["max_loops"] == 4
    return data["rows"]


ACCURACY_TASKS = ["var_assign_d0_math", "preschool_math"]


def bench_accuracy(server, out, tasks: list[str], loops: str) -> None:
    argv = ["bench", "accuracy", "--url", server.url, "--api-key", API_KEY, "--n", "4"]
    argv += ["--tasks", ",".join(tasks), "--loops", loops, "--concurrency", "8", "--out", str(out)]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def accuracy_run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    bench_accuracy(server, out, ACCURACY_TASKS, "1,2")
    return out


def test_bench_accuracy_end_to_end(accuracy_run):
    from matplotlib.image import imread

    tmp_path, tasks = accuracy_run, ACCURACY_TASKS
    rows = read_rows(tmp_path)
    assert [(r["task"], r["loops"]) for r in rows] == [
        *((t, k) for k in (1, 2) for t in tasks),
        ("mean", 1),
        ("mean", 2),
    ]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert 0 <= row["ci95_low"] <= row["accuracy"] <= row["ci95_high"] <= 1
        assert row["mean_context_tokens"] > 0
        assert 0 <= row["format_ok_rate"] <= 1 and 0 < row["guess_baseline"] < 1
    by_key = {(r["task"], r["loops"]): r for r in rows}
    assert all(by_key[t, 1]["n"] == 4 for t in tasks)
    assert by_key["preschool_math", 1]["guess_baseline"] == 0.1
    assert by_key["mean", 2]["flops_per_token"] > by_key["mean", 1]["flops_per_token"]
    assert by_key["mean", 1]["accuracy"] == pytest.approx(  # two families, one task each
        sum(by_key[t, 1]["accuracy"] for t in tasks) / 2
    )

    with (tmp_path / "accuracy.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == ROW_KEYS
    assert float(table[0]["accuracy"]) == pytest.approx(rows[0]["accuracy"])

    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(items) == 16
    assert {"task", "item", "loops", "output", "answer", "correct"} <= set(items[0])
    for item in items:  # the counts in the table are the items' own
        assert item["correct"] == (item["answer"] == item["gold"])
    for (task, k), row in by_key.items():
        if task != "mean":
            mine = [i for i in items if (i["task"], i["loops"]) == (task, k)]
            assert sorted(i["item"] for i in mine) == [0, 1, 2, 3]
            assert row["correct"] == sum(i["correct"] for i in mine)
            assert row["format_ok_rate"] == sum(i["answer"] is not None for i in mine) / 4

    paired = json.loads((tmp_path / "accuracy.json").read_text())["paired"]
    assert [(p["task"], p["loops_a"], p["loops_b"]) for p in paired] == [(t, 1, 2) for t in tasks]
    for p in paired:
        assert {"diff", "ci95_low", "ci95_high", "p_value"} <= set(p)
        assert p["ci95_low"] <= p["diff"] <= p["ci95_high"] and 0 < p["p_value"] <= 1
        assert p["diff"] == pytest.approx(
            by_key[p["task"], 2]["accuracy"] - by_key[p["task"], 1]["accuracy"]
        )
    image = imread(tmp_path / "accuracy.png")
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500


def test_bench_compare_overlays_two_runs_with_a_pareto_front(server, accuracy_run, tmp_path):
    other = tmp_path / "other"
    bench_accuracy(server, other, ["preschool_math"], "1,3")
    out = tmp_path / "compare"
    argv = ["bench", "compare", str(accuracy_run), str(other), "--labels", "two,one"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["run"], r["loops"]) for r in rows] == [
        ("two", 1),
        ("two", 2),
        ("one", 1),
        ("one", 3),
    ]
    means = [r for r in read_rows(accuracy_run) if r["task"] == "mean"]
    assert [r["accuracy"] for r in rows[:2]] == [r["accuracy"] for r in means]
    for row in rows:  # on the front iff no other point has fewer-or-equal FLOPs and more accuracy
        beaten = any(
            o is not row
            and o["flops_per_token"] <= row["flops_per_token"]
            and o["accuracy"] >= row["accuracy"]
            and (o["flops_per_token"], o["accuracy"]) != (row["flops_per_token"], row["accuracy"])
            for o in rows
        )
        assert row["pareto"] is not beaten
    with (out / "compare.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (out / "compare.md").read_text().count("\n") == 6
    assert (out / "compare.png").stat().st_size > 10_000
    assert main(["bench", "compare", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_bench_diagnose_hooks_see_every_executed_layer(tmp_path, reference, tokenizer):
    """The logit lens at the last executed layer is the reference's own next-token ranking."""
    from loopserve.benchmarks.accuracy import suite_examples
    from loopserve.benchmarks.diagnose import answer_token

    argv = ["bench", "diagnose", "--loops", "1,2", "--tasks", "preschool_math", "--n", "2"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "diagnose.json").read_text())
    curves = {c["loops"]: c for c in data["curves"]}
    assert [curves[k]["depth"] for k in (1, 2)] == [30, 34]
    assert curves[2]["passes"] == [[14, 17], [18, 21]]  # executed positions, 1-based
    for curve in curves.values():
        for key in (
            "lens_accuracy",
            "lens_rank",
            "residual_norm",
            "relative_update",
            "attn_mlp_ratio",
        ):
            assert len(curve[key]) == curve["depth"]
            assert all(math.isfinite(v) and v >= 0 for v in curve[key])
    # prelude layers run identically at every k, so their diagnostics agree
    assert curves[1]["residual_norm"][:13] == pytest.approx(curves[2]["residual_norm"][:13])
    examples = suite_examples(["preschool_math"], 2, 5, 0)
    for k in (1, 2):
        for example, prompt in zip(examples, data["prompts"], strict=True):
            logits = reference.logits(tokenizer(example.prompt)["input_ids"], k)[-1]
            answer = answer_token(tokenizer, example)
            rank = int((logits > logits[answer]).sum()) + 1
            assert prompt["final_rank"][str(k)] == rank
    assert (tmp_path / "diagnose.png").stat().st_size > 10_000


def test_bench_scan_runs_each_block_on_its_own_server(tmp_path, model_path, monkeypatch):
    """The scan's own logic, with its servers stubbed (each answers as its block's plan;
    `make bench-smoke` starts real ones): one server per block, each block's accuracy run
    backs that block's cells, the table, full-scan estimate and heatmap come from them."""
    from contextlib import contextmanager

    from loopserve.benchmarks import accuracy, scan

    started: list[list[str]] = []

    @contextmanager
    def server_for(options: list[str], log):
        started.append(options)
        yield "http://block-" + options[options.index("--loop-block") + 1]

    def card(url: str, api_key: str | None) -> dict:
        start, end = map(int, url.removeprefix("http://block-").split(":"))
        plan = {"loop_block": [start, end], "max_loops": 2, "default_loops": 1}
        return {"id": "stub", "num_layers": 30, **plan}

    async def collect(url, api_key, model_id, examples, loops, concurrency, flops, path):
        """Graded outcomes that differ by block and k, billed by the block's own plan."""
        indexed = zip(examples, accuracy.item_indices(examples), strict=True)
        return [
            accuracy.Outcome(
                task=example.task,
                item=item,
                loops=k,
                output=example.answer,
                answer=example.answer,
                gold=example.answer,
                correct=(item + k + flops.plan.start) % 3 == 0,
                prompt_tokens=20,
                completion_tokens=2,
                total_flops=accuracy.request_flops(flops, k, 20, 2),
            )
            for example, item in indexed
            for k in loops
        ]

    monkeypatch.setattr(scan, "started_server", server_for)
    monkeypatch.setattr(accuracy, "model_card", card)
    monkeypatch.setattr(accuracy, "collect", collect)
    argv = ["bench", "scan", "--blocks", "11:15,13:17", "--loops", "1,2"]
    argv += ["--tasks", "preschool_math,induction_copy", "--n", "2", "--dtype", "float32"]
    argv += ["--server-args", "--enforce-eager --max-model-len 1024", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert [o[o.index("--loop-block") + 1] for o in started] == ["11:15", "13:17"]
    for options in started:
        assert options[-3:] == ["--enforce-eager", "--max-model-len", "1024"]
        assert options[options.index("--max-loops") + 1] == "2"
    data = json.loads((tmp_path / "scan.json").read_text())
    cells = [(r["block_start"], r["block_end"], r["loops"]) for r in data["rows"]]
    assert cells == [(11, 15, 1), (11, 15, 2), (13, 17, 1), (13, 17, 2)]
    for row in data["rows"]:
        assert set(row["tasks"]) == {"preschool_math", "induction_copy"}
        assert row["ci95_low"] <= row["mean_accuracy"] <= row["ci95_high"]
        # each block's own run, with its own plan, backs the cell
        block = json.loads(
            (
                tmp_path / f"block_{row['block_start']}_{row['block_end']}" / "accuracy.json"
            ).read_text()
        )
        plan = block["config"]["loop_plan"]
        assert (plan["start"], plan["end"]) == (row["block_start"], row["block_end"])
        [mean] = [r for r in block["rows"] if r["task"] == "mean" and r["loops"] == row["loops"]]
        assert mean["accuracy"] == row["mean_accuracy"]
        assert mean["flops_per_token"] == row["flops_per_token"]
    assert len({r["mean_accuracy"] for r in data["rows"]}) > 1  # the cells are not one run's
    assert len(data["timings"]) == 2 and data["seconds"] > 0
    assert data["full_scan"]["blocks"] == 14  # 0:4 .. 26:30, stride 2
    assert data["full_scan"]["estimated_seconds"] == pytest.approx(data["seconds"] / 2 * 14)
    with (tmp_path / "scan.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "scan.png").stat().st_size > 10_000


def test_bench_accuracy_on_a_dataset(server, tmp_path):
    dataset = tmp_path / "items.jsonl"
    items = [
        {"prompt": "1+1=2\n2+3=", "answer": "5"},
        {"prompt": "a=1, b=a, b=", "answer": "1"},
        {"prompt": "x y z x y", "answer": "z", "task": "copy"},
    ]
    dataset.write_text("".join(json.dumps(i) + "\n\n" for i in items))
    argv = [
        "bench",
        "accuracy",
        "--url",
        server.url,
        "--api-key",
        API_KEY,
        "--dataset",
        str(dataset),
        "--loops",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = read_rows(tmp_path)
    assert [(r["task"], r["n"]) for r in rows] == [("dataset", 2), ("copy", 1), ("mean", 3)]


def test_a_rejected_request_stops_accuracy_with_the_servers_reason(server, tmp_path, capsys):
    dataset = tmp_path / "long.jsonl"
    dataset.write_text(json.dumps({"prompt": "a b " * 1500, "answer": "a"}) + "\n")
    argv = [
        "bench",
        "accuracy",
        "--url",
        server.url,
        "--api-key",
        API_KEY,
        "--dataset",
        str(dataset),
        "--loops",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "HTTP 400" in capsys.readouterr().err
    assert not (tmp_path / "accuracy.json").exists()


def test_loops_above_the_servers_max_is_a_clear_error(server, tmp_path, capsys):
    argv = [
        "bench",
        "serve",
        "--url",
        server.url,
        "--api-key",
        API_KEY,
        "--loops",
        "1,5",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "--loops 5 exceeds the server's max_loops=4" in capsys.readouterr().err


def test_a_missing_api_key_is_a_clear_error(server, tmp_path, capsys):
    argv = ["bench", "serve", "--url", server.url, "--api-key", "", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "HTTP 401" in capsys.readouterr().err


def requests_at(url: str, loops: int) -> float:
    """The server's count of engine requests run at `loops` (its /metrics)."""
    pattern = rf'^loopserve_requests_total{{loops="{loops}"}} (\S+)$'
    match = re.search(pattern, httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_bench_serve_end_to_end_with_a_baseline(server, model_path, tmp_path):
    """The same server stands in for the baseline; it must be sent no `loops` at all, so
    every baseline request runs at the server's default depth (3), which no load asks for."""
    from loopserve.benchmarks.accuracy import flops_model
    from loopserve.benchmarks.cli import model_card
    from loopserve.benchmarks.serve import WARMUPS

    argv = ["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--num-prompts", "6"]
    argv += ["--input-len", "16", "--output-len", "8", "--loops", "1,2", "--mixed"]
    argv += ["--concurrency", "3", "--baseline-url", server.url, "--baseline-api-key", API_KEY]
    at_default = requests_at(server.url, SERVER_DEFAULT_LOOPS)
    assert main([*argv, "--out", str(tmp_path)]) == 0
    # The baseline's ready check, warm-ups and 6 requests, and nothing else, ran at k=3.
    assert requests_at(server.url, SERVER_DEFAULT_LOOPS) - at_default == 1 + WARMUPS + 6

    result = json.loads((tmp_path / "serve.json").read_text())
    runs = {run["label"]: run for run in result["runs"]}
    assert list(runs) == ["loops=1", "loops=2", "mixed", "baseline"]
    assert [runs[k]["loops"] for k in runs] == [1, 2, "mixed", None]
    for run in runs.values():
        assert (run["completed"], run["failed"]) == (6, 0)
        assert run["total_input_tokens"] == 6 * 16
        assert run["total_output_tokens"] == 6 * 8
        assert run["duration"] > 0 and run["output_throughput"] > 0
        for key in METRICS:
            assert isinstance(run[key], float) and math.isfinite(run[key]) and run[key] > 0
        assert run["p99_ttft_ms"] >= run["median_ttft_ms"]
    flops = flops_model(model_card(server.url, API_KEY), model_path)
    for k in (1, 2):
        assert runs[f"loops={k}"]["mean_flops_per_request"] == sum(flops.request(k, 16, 8))
    mixed = sum(sum(flops.request(k, 16, 8)) for k in (1, 2, 1, 2, 1, 2))
    assert runs["mixed"]["total_flops"] == mixed
    assert "total_flops" not in runs["baseline"]
    assert {k: v["completed"] for k, v in runs["mixed"]["by_loops"].items()} == {"1": 3, "2": 3}
    assert [r["label"] for r in result["ratios"]] == ["loops=1", "loops=2", "mixed"]
    assert all(r["output_throughput"] > 0 for r in result["ratios"])
