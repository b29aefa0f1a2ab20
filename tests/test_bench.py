"""`loopserve bench`: the pure statistics, argument errors, and both benchmarks end to end.

The end-to-end tests run the real command in-process (`loopserve.server.cli.main`) against one
real server; loads are tiny because only the plumbing and file formats are under test here.
"""

from __future__ import annotations

import csv
import json
import math

import httpx
import pytest

from loopserve.benchmarks import report
from loopserve.benchmarks.serve import RequestResult, make_prompts, ratios, summarize_load
from loopserve.server.cli import main

pytestmark = pytest.mark.slow

API_KEY = "bench-key"

ROW_KEYS = {
    "task",
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


def test_wilson_interval_matches_known_values():
    low, high = report.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    assert report.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert report.wilson_interval(10, 10)[1] == 1.0
    assert report.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        report.wilson_interval(3, 2)


def test_mean_interval_contains_the_mean_and_never_collapses():
    low, high = report.mean_interval([(0, 4)] * 9)
    assert low == 0.0 and 0.0 < high < 0.2
    low, high = report.mean_interval([(0, 2), (1, 1)])
    assert low < 0.5 < high
    assert report.mean_interval([]) == (0.0, 1.0)


def test_percentiles_interpolate_like_numpy():
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert report.percentile([5.0], 99) == 5.0
    stats = report.latency_stats("ttft", [0.003, 0.001, 0.002])
    assert stats["mean_ttft_ms"] == pytest.approx(2.0)
    assert stats["median_ttft_ms"] == pytest.approx(2.0)
    assert stats["p99_ttft_ms"] == pytest.approx(2.98)
    assert set(report.latency_stats("itl", []).values()) == {None}


def test_summarize_load_uses_vllm_definitions():
    fast = RequestResult(
        loops=1, success=True, prompt_tokens=16, output_tokens=5, ttft=0.1, e2el=0.5, itl=[0.1] * 4
    )
    failed = RequestResult(loops=2, error="HTTP 500")
    metrics = summarize_load([fast, failed], duration=2.0)
    assert (metrics["completed"], metrics["failed"]) == (1, 1)
    assert metrics["request_throughput"] == pytest.approx(0.5)
    assert metrics["output_throughput"] == pytest.approx(2.5)
    assert metrics["total_token_throughput"] == pytest.approx(10.5)
    assert metrics["median_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / (5 - 1)
    assert metrics["p99_itl_ms"] == pytest.approx(100.0)
    run = {"label": "loops=1", **metrics}
    assert ratios([run], {**metrics, "median_ttft_ms": None})[0]["median_ttft_ms"] is None


def test_prompts_are_exact_length_and_reproducible():
    prompts = make_prompts(3, 16, seed=0, tag="main")
    assert [len(p) for p in prompts] == [16, 16, 16]
    assert prompts == make_prompts(3, 16, seed=0, tag="main")
    assert prompts != make_prompts(3, 16, seed=1, tag="main")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["accuracy", "--loops", "0"], "loop counts must be >= 1, got 0"),
        (["accuracy", "--loops", "1,x"], "loop counts must be integers"),
        (["accuracy", "--tasks", "nope"], "unknown task(s) nope"),
        (["accuracy", "--n", "0"], "expected an integer >= 1"),
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
def server(tmp_path_factory):
    from loopserve.server.launcher import start_server

    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    proc = start_server(["--max-model-len", "1024", "--api-key", API_KEY], str(log))
    yield proc
    proc.stop()


def test_harness_flops_equal_the_servers_usage(server):
    from loopserve.benchmarks.accuracy import flops_model, request_flops
    from loopserve.benchmarks.cli import model_card

    flops = flops_model(model_card(server.url, API_KEY), None)
    body = {"prompt": "a=1, b=2, a=", "max_tokens": 5, "temperature": 0.0, "loops": 3}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120)
    usage = response.json()["usage"]
    ours = request_flops(flops, 3, usage["prompt_tokens"], usage["completion_tokens"])
    assert ours == usage["total_flops"]


def read_rows(out) -> list[dict]:
    data = json.loads((out / "accuracy.json").read_text())
    assert data["config"]["loop_plan"]["max_loops"] == 4
    return data["rows"]


def test_bench_accuracy_end_to_end(server, tmp_path):
    from matplotlib.image import imread

    tasks = ["var_assign_d0_math", "preschool_math"]
    argv = [
        "bench",
        "accuracy",
        "--url",
        server.url,
        "--api-key",
        API_KEY,
        "--n",
        "4",
        "--tasks",
        ",".join(tasks),
        "--loops",
        "1,2",
        "--concurrency",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0

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
    by_key = {(r["task"], r["loops"]): r for r in rows}
    assert all(by_key[t, 1]["n"] == 4 for t in tasks)
    assert by_key["mean", 2]["flops_per_token"] > by_key["mean", 1]["flops_per_token"]
    assert by_key["mean", 1]["accuracy"] == pytest.approx(
        sum(by_key[t, 1]["accuracy"] for t in tasks) / 2
    )

    with (tmp_path / "accuracy.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == ROW_KEYS
    assert float(table[0]["accuracy"]) == pytest.approx(rows[0]["accuracy"])
    samples = (tmp_path / "accuracy_samples.jsonl").read_text().splitlines()
    assert len(samples) == 16
    image = imread(tmp_path / "accuracy.png")
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500


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
    dataset.write_text(json.dumps({"prompt": "a b " * 1024, "answer": "a"}) + "\n")
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


def test_bench_serve_end_to_end_with_a_baseline(server, tmp_path):
    # The same server stands in for the baseline: it must be sent no `loops` at all.
    argv = [
        "bench",
        "serve",
        "--url",
        server.url,
        "--api-key",
        API_KEY,
        "--num-prompts",
        "6",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--loops",
        "1,2",
        "--mixed",
        "--concurrency",
        "3",
        "--baseline-url",
        server.url,
        "--baseline-api-key",
        API_KEY,
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0

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
    assert {k: v["completed"] for k, v in runs["mixed"]["by_loops"].items()} == {"1": 3, "2": 3}
    assert [r["label"] for r in result["ratios"]] == ["loops=1", "loops=2", "mixed"]
    assert all(r["output_throughput"] > 0 for r in result["ratios"])
