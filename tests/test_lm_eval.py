"""lm-eval's `local-completions` backend against a live server: generate and loglikelihood.

No dataset hub here, so the two tasks are written as lm-eval task configs over local
JSONL files. `--gen_kwargs loops=2` reaches generate requests; lm-eval sends no
gen_kwargs with loglikelihood requests, which run at the server's default loops.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

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


def test_lm_eval_generate_and_loglikelihood(tmp_path, model_path):
    from loopserve.server.launcher import start_server

    write_tasks(tmp_path)
    server = start_server(["--max-model-len", "1024"], str(tmp_path / "server.log"))
    try:
        import httpx

        name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        env = {
            **os.environ,
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "OPENAI_API_KEY": "unused",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "local-completions",
                "--model_args",
                f"model={name},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={model_path},num_concurrent=2,max_retries=1",
                "--tasks",
                "loopserve_arith_gen,loopserve_arith_ll",
                "--include_path",
                str(tmp_path),
                "--gen_kwargs",
                "loops=2",
                "--output_path",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        [results_file] = list((tmp_path / "out").rglob("results_*.json"))
        results = json.loads(results_file.read_text())["results"]
        assert set(results) == {"loopserve_arith_gen", "loopserve_arith_ll"}
        # Each generate request (one per question) carried loops=2; every loglikelihood
        # one (one per question and choice) ran at the default depth, 1.
        assert requests_at(server.url, 2) == len(QUESTIONS)
        assert requests_at(server.url, 1) >= len(QUESTIONS) * 10
    finally:
        server.stop()


def test_bench_lm_eval_runs_every_task_kind_at_each_k(tmp_path):
    """`bench lm-eval`: one server per k, so loglikelihood requests run at k too."""
    from loopserve.server.cli import main

    write_tasks(tmp_path)
    out = tmp_path / "out"
    argv = ["bench", "lm-eval", "--tasks", str(tmp_path), "--loops", "1,2", "--dtype", "float32"]
    argv += ["--server-args", "--enforce-eager --max-model-len 1024", "--out", str(out)]
    assert main(argv) == 0
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
