"""The HTTP server as users meet it: `loopserve serve` (vLLM's OpenAI server with loopserve's
plugin) in a real process, real HTTP on loopback, real clients.

The tests share the session's compiled server (conftest `shared_server`) and check what
loopserve adds: loops in usage and FLOPs, prefix-cache isolation across depths, loops on
paths where vLLM makes its own parameters, loop validation, the loop plan, metrics, the
API key and body limit, clients and CLI. vLLM's own features (validation, logprobs,
tokenizer routes, structured outputs, ...) are vLLM's tests; one smoke test shows they
still work through loopserve's middleware. The SIGTERM test ends a server of its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import SERVER_API_KEY as API_KEY
from conftest import SERVER_DEFAULT_LOOPS, SERVER_MAX_MODEL_LEN

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT = 60


@pytest.fixture(scope="module")
def url(shared_server) -> str:
    return shared_server.url


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


@pytest.fixture(scope="module")
def flops(model_path):
    """The FLOPs model of the served model, built here from its checkpoint."""
    from loopserve.server.flops import FlopsModel, ModelShape
    from loopserve.server.loop_plan import LoopPlan

    config = json.loads((Path(model_path) / "config.json").read_text())
    return FlopsModel(ModelShape.from_hf_config(config), LoopPlan.for_model(30))


def model_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def metric(http, name: str) -> float:
    """Sum of a metric's samples; `name` may include labels, e.g. `x_total{loops="2"}`."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_lists_the_loop_plan(http):
    [card] = http.get("/v1/models").json()["data"]
    assert card["num_layers"] == 30
    assert card["loop_block"] == [13, 17]
    assert card["max_loops"] == 4
    assert card["default_loops"] == SERVER_DEFAULT_LOOPS
    assert card["max_model_len"] == SERVER_MAX_MODEL_LEN


def test_openai_sdk_completions_with_loops(openai_client, http):
    model = model_name(http)
    usages, texts = [], []
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
    body = {"model": model_name(http), "prompt": "def fibonacci(n):", "max_tokens": 10}
    stream = openai_client.completions.create(
        **body,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"loops": 2},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 10
    whole = openai_client.completions.create(**body, temperature=0, extra_body={"loops": 2})
    assert whole.choices[0].text == text
    assert chunks[-1].usage.model_dump(exclude_none=True) == whole.usage.model_dump(
        exclude_none=True
    )
    assert whole.usage.model_dump()["loops"] == 2


def test_openai_sdk_chat(openai_client, http):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": model_name(http), "messages": messages, "max_tokens": 12, "temperature": 0}
    response = openai_client.chat.completions.create(**body, extra_body={"loops": 3})
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage.model_dump()["loops"] == 3
    stream = openai_client.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}, extra_body={"loops": 3}
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == response.choices[0].message.content
    final = chunks[-1].usage.model_dump()
    assert final["loops"] == 3
    assert final["total_flops"] == response.usage.model_dump()["total_flops"]


def test_vllm_xargs_equals_top_level_loops(http):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    top = http.post("/v1/completions", json={**body, "loops": 3}).json()
    xargs = http.post("/v1/completions", json={**body, "vllm_xargs": {"loops": 3}}).json()
    other = http.post("/v1/completions", json={**body, "loops": 1}).json()
    assert [c["text"] for c in top["choices"]] == [c["text"] for c in xargs["choices"]]
    assert top["usage"] == xargs["usage"]
    assert top["usage"]["loops"] == 3
    assert other["usage"]["total_flops"] < top["usage"]["total_flops"]


def expected_flops(flops, loops: int, sequences: list[tuple[int, int]], prompts: list[int]):
    """(prompt, completion) FLOPs: each prompt once, each choice on its own length."""
    prompt = sum(flops.span(loops, 0, p) for p in prompts)
    completion = sum(flops.span(loops, p, p + c) for p, c in sequences)
    return prompt, completion


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_usage_flops_are_exact_per_sequence(http, flops, stream):
    """n=2 over two prompts of different lengths: choices end at different lengths, so
    pricing from totals would be wrong; checked against the FLOPs model on token ids."""
    body = {
        "prompt": ["Tell me a story about a dragon", "Hi"],
        "n": 2,
        "max_tokens": 12,
        "min_tokens": 1,
        "temperature": 1.0,
        "seed": 3,
        "loops": 2,
        "return_token_ids": True,
        "echo": not stream,  # echo must not change the price
    }
    prompts: dict[int, int] = {}
    completions: dict[int, int] = {}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        usage = None
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event["choices"]:
                    if choice.get("prompt_token_ids"):
                        prompts[choice["index"]] = len(choice["prompt_token_ids"])
                    completions[choice["index"]] = completions.get(choice["index"], 0) + len(
                        choice["token_ids"] or []
                    )
    else:
        result = http.post("/v1/completions", json=body).json()
        usage = result["usage"]
        for choice in result["choices"]:
            prompts[choice["index"]] = len(choice["prompt_token_ids"])
            completions[choice["index"]] = len(choice["token_ids"])
    assert sorted(prompts) == [0, 1, 2, 3]
    sequences = [(prompts[i], completions[i]) for i in range(4)]
    prompt, completion = expected_flops(flops, 2, sequences, [prompts[0], prompts[2]])
    assert usage["prompt_tokens"] == prompts[0] + prompts[2]
    assert usage["completion_tokens"] == sum(completions.values())
    assert (usage["prompt_flops"], usage["completion_flops"]) == (prompt, completion)
    assert usage["total_flops"] == prompt + completion


def test_vllm_features_work_through_the_middleware(http):
    """Smoke: loopserve's middleware (which rewrites bodies) leaves vLLM's features intact.

    One looped chat request with a JSON schema, logprobs and a request id; a bad sampling
    parameter beside `loops` still gets vLLM's own 400; /tokenize and /detokenize answer.
    """
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Lyon", "Marseille"]},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    body = {
        "messages": [{"role": "user", "content": "Give the largest city of France as JSON."}],
        "max_tokens": 60,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        "loops": 2,
    }
    response = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "r-42"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "r-42"
    result = response.json()
    [choice] = result["choices"]
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    entries = choice["logprobs"]["content"]
    assert len(entries) == result["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in entries)
    assert result["usage"]["loops"] == 2

    bad = http.post("/v1/completions", json={"prompt": "Hi", "temperature": -1, "loops": 2})
    assert bad.status_code == 400
    assert "temperature" in bad.json()["error"]["message"]

    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert len(tokens) == 2
    assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "Hello world"


def test_responses_api_carries_loops(http):
    before = metric(http, 'loopserve_requests_total{loops="2"}')
    response = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 5, "loops": 2})
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["content"][0]["text"]
    assert metric(http, 'loopserve_requests_total{loops="2"}') == before + 1


# ----- prefix-cache isolation by depth; `loops` on vLLM's own sampling parameters ---------


def _cached_completion(http, prompt: str, **fields) -> tuple[str, int]:
    """Greedy text and the prompt tokens vLLM served from its prefix cache."""
    body = {"model": model_name(http), "prompt": prompt, "max_tokens": 8, "temperature": 0}
    response = http.post("/v1/completions", json={**body, **fields})
    assert response.status_code == 200, response.text
    data = response.json()
    return data["choices"][0]["text"], data["usage"]["prompt_tokens_details"]["cached_tokens"]


def _isolation_prompt(tag: str) -> str:
    """About 280 tokens (over 256, so whole blocks get cached), unique to the test."""
    return " ".join(f"{tag} line {i}: the {i}th lamp is red." for i in range(26))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"cache_salt": "loops=4"}, {"loops": 4}),  # default depth salted to look like 4
        ({"cache_salt": "t1|loops=4"}, {"cache_salt": "t1", "loops": 4}),
        ({"cache_salt": "same"}, {"cache_salt": "same", "loops": 4}),  # one salt, two depths
        ({"loops": 3}, {"loops": 4}),
    ],
    ids=["forged-salt", "forged-folded-salt", "same-salt", "no-salt"],
)
def test_prefix_cache_never_crosses_depths(http, request, first, second):
    """Breakage caught: a deep request reusing KV computed at another depth.

    The reused blocks' pass planes were never written for this prompt, so the text
    differs from a fresh run of the same request.
    """
    prompt = _isolation_prompt(request.node.callspec.id)
    _cached_completion(http, prompt, **first)
    text, cached = _cached_completion(http, prompt, **second)
    fresh_salt = f"fresh-{time.monotonic_ns()}"
    fresh, fresh_cached = _cached_completion(http, prompt, **{**second, "cache_salt": fresh_salt})
    assert fresh_cached == 0
    assert cached == 0
    assert text == fresh


def test_prefix_cache_is_reused_at_the_same_depth(http):
    """Breakage caught: isolation bought by never caching (or a salt that changes per call)."""
    prompt = _isolation_prompt("reuse")
    first, _ = _cached_completion(http, prompt, cache_salt="mine", loops=4)
    again, cached = _cached_completion(http, prompt, cache_salt="mine", loops=4)
    assert cached >= 256
    assert again == first


def test_beam_search_runs_at_the_requested_depth(http):
    """Breakage caught: `loops` dropped where vLLM builds its own sampling parameters.

    vLLM's beam search sends one request per step with parameters it makes itself; one
    beam is greedy decoding, so each depth's beam equals that depth's greedy text.
    """
    prompt = "The three most common colors of cars are"
    texts = {}
    for loops in (1, 4):
        greedy, _ = _cached_completion(http, prompt, loops=loops)
        body = {"model": model_name(http), "prompt": prompt, "max_tokens": 8, "loops": loops}
        response = http.post("/v1/completions", json={**body, "use_beam_search": True, "n": 1})
        assert response.status_code == 200, response.text
        beam = response.json()
        assert beam["usage"]["loops"] == loops
        assert beam["choices"][0]["text"] == greedy
        texts[loops] = greedy
    assert texts[1] != texts[4]


def test_metrics_serve_vllm_and_loopserve_counters(http):
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens"):
        assert name in text
    before = {
        name: metric(http, name)
        for name in (
            'loopserve_requests_total{loops="3"}',
            "loopserve_generated_tokens_total",
            "loopserve_flops_total",
        )
    }
    usage = http.post(
        "/v1/completions",
        json={"prompt": "Count:", "max_tokens": 7, "ignore_eos": True, "loops": 3},
    ).json()["usage"]
    assert (
        metric(http, 'loopserve_requests_total{loops="3"}')
        == before['loopserve_requests_total{loops="3"}'] + 1
    )
    assert metric(http, "loopserve_generated_tokens_total") == (
        before["loopserve_generated_tokens_total"] + 7
    )
    assert metric(http, "loopserve_flops_total") == pytest.approx(
        before["loopserve_flops_total"] + usage["total_flops"], rel=1e-12
    )
    assert metric(http, "loopserve_requests_running") == 0


# ----- bad input ------------------------------------------------------------------------

GOOD = {"prompt": "Hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
STREAM = {"stream": True}

BAD_LOOPS = [0, -1, 5, 2.5, "2", True, None, [3]]
# (path, body, expected status, text expected in the message)
BAD_LOOPS_REQUESTS = [
    *(("/v1/completions", {**GOOD, "loops": v}, 400, "loops") for v in BAD_LOOPS),
    *(("/v1/completions", {**GOOD, **STREAM, "loops": v}, 400, "loops") for v in BAD_LOOPS),
    *(("/v1/chat/completions", {**CHAT, **STREAM, "loops": v}, 400, "loops") for v in BAD_LOOPS),
    ("/v1/completions", {**GOOD, "vllm_xargs": {"loops": 9}}, 400, "loops"),
    ("/v1/completions", {**GOOD, **STREAM, "vllm_xargs": {"loops": "2"}}, 400, "loops"),
    ("/v1/completions", {**GOOD, "loops": 2, "vllm_xargs": {"loops": 3}}, 400, "disagree"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 3, "loops": 9}, 400, "loops"),
]


def bad_request_failures(http, cases: list[tuple]) -> list[tuple]:
    failures = []
    for path, body, status, text in cases:
        response = http.post(path, json=body)
        error = response.json().get("error", {}) if response.status_code == status else {}
        if response.status_code != status or text.lower() not in error.get("message", "").lower():
            failures.append((path, str(body)[:80], response.status_code, response.text[:300]))
        elif set(error) != {"message", "type", "param", "code"} or error["code"] != status:
            failures.append((path, str(body)[:80], "shape", error))
    return failures


def test_bad_loops_are_refused_before_any_work(http):
    before = metric(http, "loopserve_requests_total")
    failures = bad_request_failures(http, BAD_LOOPS_REQUESTS)
    assert not failures, json.dumps(failures, indent=1, default=str)
    assert metric(http, "loopserve_requests_total") == before  # none reached the engine


def test_malformed_json_and_oversized_bodies(http):
    response = http.post(
        "/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "json" in response.json()["error"]["message"].lower()
    huge = json.dumps({"prompt": "x" * (5 * 1024 * 1024)}).encode()

    def chunked():  # no Content-Length: only counting the streamed body can catch it
        for start in range(0, len(huge), 1 << 20):
            yield huge[start : start + (1 << 20)]

    for content in (huge, chunked()):
        response = http.post(
            "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == 413
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_api_key_guards_every_model_route(url):
    routes = ["/v1/completions", "/v1/chat/completions", "/invocations", "/tokenize"]
    for path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.post(f"{url}{path}", json=GOOD, headers=headers)
            assert response.status_code == 401, path
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


# ----- load, hang-ups, clients ----------------------------------------------------------


def test_many_concurrent_streams_with_mixed_loops(url, http):
    async def one(client: httpx.AsyncClient, i: int) -> str:
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
        return "".join(pieces)

    async def main() -> list[str]:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    before = [metric(http, f'loopserve_requests_total{{loops="{k}"}}') for k in (1, 2, 3, 4)]
    texts = asyncio.run(main())
    assert len(texts) == 64 and all(texts)
    after = [metric(http, f'loopserve_requests_total{{loops="{k}"}}') for k in (1, 2, 3, 4)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [16, 16, 16, 16]


def test_clients_that_hang_up_are_aborted(url, http):
    """15 streams leave after their first chunk, 15 whole requests after 1 s; each asked
    for 400 tokens. Generation must stop: few tokens, and none once everyone has left."""

    def body(i: int, stream: bool) -> dict:
        return {
            "prompt": f"Count to a thousand, {i}:",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": stream,
            "loops": (i % 4) + 1,
        }

    async def leave_streaming(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", "/v1/completions", json=body(i, True)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # closing the stream hangs up

    async def leave_whole(client: httpx.AsyncClient, i: int) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=body(i, False), timeout=1.0)

    async def main() -> None:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as client:
            await asyncio.gather(
                *(leave_streaming(client, i) for i in range(15)),
                *(leave_whole(client, i) for i in range(15, 30)),
            )

    tokens_before = metric(http, "loopserve_generated_tokens_total")
    asyncio.run(main())
    deadline = time.monotonic() + 30
    while metric(http, "loopserve_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(http, "loopserve_requests_running") == 0
    settled = metric(http, "loopserve_generated_tokens_total")
    engine_settled = metric(http, "vllm:generation_tokens_total")
    time.sleep(3)
    assert metric(http, "loopserve_generated_tokens_total") == settled
    assert metric(http, "vllm:generation_tokens_total") == engine_settled  # engine idle
    assert settled - tokens_before < 30 * 400 / 4


def test_python_client_sync_and_async(url):
    import openai

    from loopserve.clients.client import AsyncLoopserveClient, LoopserveClient

    prompt = "The capital of France is"
    messages = [{"role": "user", "content": "Hi"}]
    with LoopserveClient(url, api_key=API_KEY) as client:
        assert client.models().data[0].max_loops == 4
        result = client.complete(prompt, loops=2, max_tokens=6, temperature=0)
        assert result.usage.loops == 2 and result.usage.total_flops > 0
        streamed = "".join(
            c.choices[0].text
            for c in client.stream_complete(prompt, loops=2, max_tokens=6, temperature=0)
            if c.choices
        )
        assert streamed == result.choices[0].text
        chat = client.chat(messages, loops=3, max_tokens=4, temperature=0)
        assert chat.usage.loops == 3
        with pytest.raises(openai.BadRequestError) as error:
            client.complete("x", loops=99)
        assert error.value.status_code == 400

    async def run_async() -> tuple[str, str]:
        async with AsyncLoopserveClient(url, api_key=API_KEY) as client:
            result = await client.complete(prompt, loops=2, max_tokens=6, temperature=0)
            chat = "".join(
                [
                    c.choices[0].delta.content or ""
                    async for c in client.stream_chat(
                        messages, loops=3, max_tokens=4, temperature=0
                    )
                    if c.choices
                ]
            )
            return result.choices[0].text, chat

    assert asyncio.run(run_async()) == (streamed, chat.choices[0].message.content)


CLI = (sys.executable, "-m", "loopserve.server.cli")


def loopserve_cli(
    url: str, command: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, command, "--url", url, "--loops", "2", "--api-key", API_KEY, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_cli_complete(url):
    """`--loops 2` reaches the server: the usage line on stderr reports the depth run."""
    result = loopserve_cli(url, "complete", "--max-tokens", "6", "The capital of France is")
    assert "Paris" in result.stdout
    assert "[loops=2, " in result.stderr


def test_cli_chat_reads_stdin(url):
    result = loopserve_cli(url, "chat", "--max-tokens", "8", stdin="The capital of France?\n")
    assert result.stdout.strip()
    assert "[loops=2, " in result.stderr


# ----- shutdown, on a server of its own -------------------------------------------------


def test_sigterm_drains_streams_then_exits_0(tmp_path):
    """Streams in flight (looped ones among them) when SIGTERM arrives finish; then the
    process exits 0. Eager: a throwaway server starts faster."""
    from loopserve.server.launcher import start_server

    options = ["--enforce-eager", "--max-model-len", "512"]
    server = start_server(
        [*options, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], str(tmp_path / "server.log")
    )
    started = threading.Barrier(5)
    results: list[bool] = []

    def stream(i: int) -> None:
        body = {
            "prompt": f"Tale {i}:",
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
            "loops": i + 1,
        }
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    break
            started.wait()
            results.append("data: [DONE]" in list(lines))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        started.wait()
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=SHUTDOWN_TIMEOUT + 30) == 0
        assert time.monotonic() - sent < SHUTDOWN_TIMEOUT + 30
        for thread in threads:
            thread.join(timeout=10)
        assert results == [True] * 4
    finally:
        server.stop()
