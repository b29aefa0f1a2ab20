"""A real engine failure: the vLLM engine process dies under a live server.

loopserve follows vLLM here: the request in flight ends with an error event in its
stream (not a hung connection), and the server process exits so that an orchestrator
restarts it (vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=0 default).
"""

from __future__ import annotations

import json

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow


def test_engine_death_fails_the_stream_and_the_server_exits(tmp_path, model_path):
    from loopserve.server.launcher import start_server

    # A server of its own, since the test ends it; eager, which starts faster.
    options = ["--enforce-eager", "--max-model-len", "1024"]
    server = start_server(options, str(tmp_path / "server.log"))
    try:
        [engine_core] = [
            p
            for p in psutil.Process(server.process.pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]
        body = {
            "prompt": "Count slowly:",
            "max_tokens": 800,
            "ignore_eos": True,
            "stream": True,
            "loops": 4,
        }
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    engine_core.kill()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] >= 500
        server.process.wait(timeout=60)  # the API server follows its engine out
    finally:
        server.stop()
