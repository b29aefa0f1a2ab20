"""A real engine failure: the vLLM engine process dies under a live server.

The request in flight fails with a 500 (an error event in its stream), later requests get
503, /health says 503, and the HTTP server itself stays up and answers.
"""

from __future__ import annotations

import json
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow


def test_engine_death_fails_requests_cleanly(tmp_path, model_path):
    from loopserve.server.launcher import start_server

    server = start_server(["--max-model-len", "1024"], str(tmp_path / "server.log"))
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
        assert error["code"] == 500 and error["type"] == "server_error"

        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").status_code != 503:
            assert time.monotonic() < deadline, "health never reported the dead engine"
            time.sleep(0.5)
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"})
        assert response.status_code == 503
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert server.process.poll() is None  # the HTTP server is still up
    finally:
        server.stop()
