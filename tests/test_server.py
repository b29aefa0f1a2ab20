"""The HTTP server as users meet it: a real `loopserve serve` process, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    from loopserve.server.launcher import start_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = start_server(
        ["--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64"],
        str(log),
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture
def http(url):
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as client:
        yield client


@pytest.fixture
def openai_client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)


def model_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def test_health_was_503_until_the_engine_was_ready(server):
    assert server.health_codes[0] == 503
    assert server.health_codes[-1] == 200


def test_models_lists_the_loop_plan(http):
    [card] = http.get("/v1/models").json()["data"]
    assert card["num_layers"] == 30
    assert card["loop_block"] == [13, 17]
    assert card["max_loops"] == 4
    assert card["default_loops"] == 1
    assert card["max_model_len"] == MAX_MODEL_LEN


def test_openai_sdk_completions_with_loops(openai_client, http):
    model = model_name(http)
    usages = []
    texts = []
    for loops in (1, 2, 4):
        response = openai_client.completions.create(
            model=model,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            extra_body={"loops": loops},
        )
        usage = response.usage.model_dump()
        assert usage["loops"] == loops
        assert usage["completion_tokens"] == 8
        assert usage["total_flops"] == usage["prompt_flops"] + usage["completion_flops"]
        usages.append(usage)
        texts.append(response.choices[0].text)
    flops = [u["total_flops"] for u in usages]
    assert flops[0] < flops[1] < flops[2]
    assert "Paris" in texts[0]


def test_openai_sdk_streaming_completion(openai_client, http):
    stream = openai_client.completions.create(
        model=model_name(http),
        prompt="def fibonacci(n):",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"loops": 2},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.model_dump()["loops"] == 2
    whole = openai_client.completions.create(
        model=model_name(http),
        prompt="def fibonacci(n):",
        max_tokens=10,
        temperature=0,
        extra_body={"loops": 2},
    )
    assert whole.choices[0].text == text


def test_openai_sdk_chat(openai_client, http):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    response = openai_client.chat.completions.create(
        model=model_name(http),
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"loops": 3},
    )
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage.model_dump()["loops"] == 3
    stream = openai_client.chat.completions.create(
        model=model_name(http),
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"loops": 3},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == response.choices[0].message.content


def test_chat_logprobs(openai_client, http):
    response = openai_client.chat.completions.create(
        model=model_name(http),
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))


def test_vllm_xargs_equals_top_level_loops(http):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    top = http.post("/v1/completions", json={**body, "loops": 3}).json()
    xargs = http.post("/v1/completions", json={**body, "vllm_xargs": {"loops": 3}}).json()
    other = http.post("/v1/completions", json={**body, "loops": 1}).json()
    assert top["choices"] == xargs["choices"]
    assert top["usage"] == xargs["usage"]
    assert top["usage"]["loops"] == 3
    assert other["usage"]["total_flops"] < top["usage"]["total_flops"]


def test_echo_logprobs_and_token_prompts(http):
    """lm-eval's loglikelihood request: token ids, echo, logprobs, one new token."""
    body = {
        "prompt": [[1, 504, 3575, 282], [1, 504]],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
    }
    choices = http.post("/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    first = choices[0]["logprobs"]
    assert len(first["tokens"]) == 5
    assert first["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in first["token_logprobs"][1:])
    assert all(len(top) >= 1 for top in first["top_logprobs"][1:])


def test_n_and_seed(http):
    body = {
        "prompt": "Tell me a story",
        "max_tokens": 8,
        "temperature": 1.0,
        "n": 3,
        "seed": 7,
        "ignore_eos": True,
    }
    a = http.post("/v1/completions", json=body).json()
    b = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] == 24


GOOD = {"prompt": "Hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG_PROMPT = "hello " * (MAX_MODEL_LEN + 10)

BAD_REQUESTS = [
    # (path, body, expected status, text expected in the message)
    ("/v1/completions", {**GOOD, "loops": 0}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": -1}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": 5}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": 2.5}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": "3"}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": None}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": []}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": True}, 400, "loops"),
    ("/v1/completions", {**GOOD, "vllm_xargs": {"loops": 9}}, 400, "loops"),
    ("/v1/completions", {**GOOD, "vllm_xargs": {"loops": "2"}}, 400, "loops"),
    ("/v1/completions", {**GOOD, "vllm_xargs": {"foo": 1}}, 400, "vllm_xargs"),
    ("/v1/completions", {**GOOD, "loops": 2, "vllm_xargs": {"loops": 3}}, 400, "disagree"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": MAX_MODEL_LEN * 2}, 400, "context"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {**GOOD, "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "n": 1000}, 400, "n"),
    ("/v1/completions", {**GOOD, "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "logprobs": 100}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "stop": 5}, 400, "stop"),
    ("/v1/completions", {**GOOD, "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {**GOOD, "best_of": 2}, 400, "unsupported parameter: best_of"),
    ("/v1/completions", {**GOOD, "logit_bias": {"1": 2}}, 400, "unsupported parameter"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [{"a": 1}]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [-1, 2]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": LONG_PROMPT}, 400, "context"),
    ("/v1/completions", {**GOOD, "model": "no-such-model"}, 404, "no-such-model"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "role",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "content"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        400,
        "content",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "loops": 7}, 400, "loops"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "gpt-4"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "context",
    ),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http):
    assert len(BAD_REQUESTS) >= 40
    failures = []
    for path, body, status, text in BAD_REQUESTS:
        response = http.post(path, json=body)
        error = response.json().get("error", {}) if response.status_code == status else {}
        if response.status_code != status or text.lower() not in error.get("message", "").lower():
            failures.append((path, str(body)[:80], response.status_code, response.text[:300]))
        elif set(error) != {"message", "type", "param", "code"} or "Traceback" in response.text:
            failures.append((path, str(body)[:80], "shape", error))
    assert not failures, json.dumps(failures, indent=1, default=str)
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_malformed_json_and_oversized_body(http):
    response = http.post(
        "/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]
    huge = json.dumps({"prompt": "x" * (5 * 1024 * 1024)})
    response = http.post(
        "/v1/completions", content=huge, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_api_key_is_enforced(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{url}/v1/completions", json=GOOD, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_openapi_schema_describes_loops(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "loops" in components["CompletionRequest"]["properties"]
    assert "loops" in components["ChatCompletionRequest"]["properties"]
    assert "total_flops" in components["Usage"]["properties"]


def metric(http, name: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_many_concurrent_streams_with_mixed_loops(url, http):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        body = {
            "prompt": f"Story number {i}:",
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "loops": (i % 4) + 1,
        }
        pieces, done = [], False
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert done
        return i, "".join(pieces)

    async def main() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    before = metric(http, "loopserve_requests_total")
    results = asyncio.run(main())
    assert len(results) == 64 and all(text for _, text in results)
    assert metric(http, "loopserve_requests_total") - before == 64


def test_clients_that_hang_up_are_aborted(url, http):
    async def hang_up(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "prompt": f"Count to a thousand, {i}:",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
            "loops": (i % 4) + 1,
        }
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first chunk; closing the stream hangs up

    async def main() -> None:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as client:
            await asyncio.gather(*(hang_up(client, i) for i in range(30)))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while metric(http, "loopserve_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(http, "loopserve_requests_running") == 0
    # Aborted, not finished: far fewer tokens than 30 * 400 were generated.
    assert (
        metric(http, 'loopserve_requests_total{endpoint="completions",loops="1",status="499"}') > 0
    )


def test_metrics_exposed(http):
    text = http.get("/metrics").text
    for name in (
        "loopserve_requests_total",
        "loopserve_requests_running",
        "loopserve_generated_tokens_total",
        "loopserve_flops_total",
        "loopserve_time_to_first_token_seconds_bucket",
        "loopserve_inter_token_latency_seconds_bucket",
        "loopserve_e2e_request_latency_seconds_bucket",
    ):
        assert name in text


def test_python_client_sync_and_async(url):
    from loopserve.clients.client import AsyncLoopserveClient, LoopserveClient, LoopserveError

    with LoopserveClient(url, api_key=API_KEY) as client:
        assert client.models().data[0].max_loops == 4
        result = client.complete("The capital of France is", loops=2, max_tokens=6, temperature=0)
        assert result.usage.loops == 2 and result.usage.total_flops > 0
        streamed = "".join(
            c.choices[0].text
            for c in client.stream_complete(
                "The capital of France is", loops=2, max_tokens=6, temperature=0
            )
            if c.choices
        )
        assert streamed == result.choices[0].text
        chat = client.chat([{"role": "user", "content": "Hi"}], loops=3, max_tokens=4)
        assert chat.usage.loops == 3
        with pytest.raises(LoopserveError) as error:
            client.complete("x", loops=99)
        assert error.value.status == 400

    async def run_async() -> str:
        async with AsyncLoopserveClient(url, api_key=API_KEY) as client:
            result = await client.complete(
                "The capital of France is", loops=2, max_tokens=6, temperature=0
            )
            return result.choices[0].text

    assert asyncio.run(run_async()) == streamed


def test_cli_complete(url):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopserve.server.cli",
            "complete",
            "--url",
            url,
            "--loops",
            "2",
            "--max-tokens",
            "6",
            "--api-key",
            API_KEY,
            "The capital of France is",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Paris" in out.stdout


def test_cli_chat_reads_stdin(url):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopserve.server.cli",
            "chat",
            "--url",
            url,
            "--loops",
            "2",
            "--max-tokens",
            "8",
            "--api-key",
            API_KEY,
        ],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip()
