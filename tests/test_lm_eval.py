"""`loopserve bench lm-eval` (lm-eval's harness, generate and loglikelihood requests) against
the session's shared server, at each loop count.

No dataset hub here, so the two tasks are written as lm-eval task configs over local
JSONL files.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import SERVER_API_KEY, SERVER_DEFAULT_LOOPS

pytestmark = pytest.mark.slow

QUESTIONS = [("2+3=", "5"), ("4+4=", "8"), ("9-5=", "4"), ("1+6=", "7"), ("8-2=", "6")]


def write_tasks(root) -> None:
    data = root / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    common = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        'doc_to_text: "1+1=2\\n3+1=4\\n{{question}}"\n'
    )
    (root / "gen.yaml").write_text(
        "task: loopserve_arith_gen\n" + common + "output_type: generate_until\n"
        'doc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (root / "ll.yaml").write_text(
        "task: loopserve_arith_ll\n" + common + "output_type: multiple_choice\n"
        'doc_to_choice: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]\n'
        "doc_to_target: \"{{['0','1','2','3','4','5','6','7','8','9'].index(answer)}}\"\n"
        "metric_list:\n  - metric: acc\n"
    )


def requests_at(url: str, loops: int) -> float:
    """The server's count of engine requests run at `loops` (its /metrics)."""
    import httpx

    pattern = rf'^loopserve_requests_total{{loops="{loops}"}} (\S+)$'
    match = re.search(pattern, httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_bench_lm_eval_runs_every_task_kind_at_each_k(tmp_path, shared_server):
    """One server for every k: lm-eval sends `loops` with each request, loglikelihood ones
    too (stock lm-eval sends none with those, and they would run at the default depth)."""
    from loopserve.server.cli import main

    write_tasks(tmp_path)
    url = shared_server.url
    before = {k: requests_at(url, k) for k in (1, 2, SERVER_DEFAULT_LOOPS)}
    out = tmp_path / "out"
    argv = ["bench", "lm-eval", "--url", url, "--api-key", SERVER_API_KEY]
    argv += ["--tasks", str(tmp_path), "--loops", "1,2", "--out", str(out)]
    assert main(argv) == 0
    ran = {k: requests_at(url, k) - at for k, at in before.items()}
    # At each k, one generate request per question and one loglikelihood request per
    # question and choice; none without `loops` (it would run at the default depth).
    assert ran == {1: len(QUESTIONS) * 11, 2: len(QUESTIONS) * 11, SERVER_DEFAULT_LOOPS: 0}
    data = json.loads((out / "accuracy.json").read_text())
    rows = {(r["task"], r["loops"]): r for r in data["rows"]}
    tasks = ("loopserve_arith_gen", "loopserve_arith_ll")
    assert set(rows) == {(t, k) for t in (*tasks, "mean") for k in (1, 2)}
    for k in (1, 2):
        [results_file] = list((out / "lm_eval" / f"loops_{k}").rglob("results_*.json"))
        results = json.loads(results_file.read_text())["results"]
        assert rows[tasks[0], k]["accuracy"] == results[tasks[0]]["exact_match,none"]
        assert rows[tasks[1], k]["accuracy"] == results[tasks[1]]["acc,none"]
        assert all(rows[t, k]["n"] == len(QUESTIONS) for t in tasks)
    assert rows["mean", 2]["flops_per_token"] > rows["mean", 1]["flops_per_token"]
    assert {(p["task"], p["loops_a"], p["loops_b"]) for p in data["paired"]} == {
        (t, 1, 2) for t in tasks
    }

    def loglikelihoods(k: int) -> list:
        [samples] = list((out / "lm_eval" / f"loops_{k}").rglob("samples_loopserve_arith_ll_*"))
        return [json.loads(line)["resps"] for line in samples.read_text().splitlines()]

    assert loglikelihoods(1) != loglikelihoods(2)  # k reached the loglikelihood requests
    assert (out / "accuracy.png").stat().st_size > 10_000
