"""The Python client against a stand-in HTTP server: waiting, `loops`, typed loop fields.

A stdlib server plays the part (no engine), so these run in the fast suite; the client
against the real server is in test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from loopserve.clients.client import AsyncLoopserveClient, LoopserveClient

MODEL = {
    "id": "tiny",
    "object": "model",
    "created": 0,
    "owned_by": "loopserve",
    "num_layers": 30,
    "loop_block": [13, 17],
    "max_loops": 4,
    "default_loops": 1,
}
USAGE = {
    "prompt_tokens": 3,
    "completion_tokens": 2,
    "total_tokens": 5,
    "prompt_flops": 30,
    "completion_flops": 20,
    "total_flops": 50,
}


class StandIn(ThreadingHTTPServer):
    """Answers /v1/models and /v1/completions like loopserve; records request bodies."""

    def __init__(self, port: int, status: int = 200) -> None:
        self.status, self.bodies = status, []
        super().__init__(("127.0.0.1", port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.bodies.append(None)
        self.reply({"object": "list", "data": [MODEL]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.bodies.append(body)
        loops = body.get("loops", MODEL["default_loops"])
        choice = {"index": 0, "text": " Paris", "finish_reason": "length"}
        self.reply(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "usage": {**USAGE, "loops": loops},
            }
        )

    def reply(self, data: dict) -> None:
        if self.server.status != 200:
            data = {"error": {"message": "not ready", "type": "x", "code": self.server.status}}
        payload = json.dumps(data).encode()
        self.send_response(self.server.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(server: StandIn) -> StandIn:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_waits_for_a_server_that_is_still_starting():
    """Connections are refused for a second; the client keeps trying and gets its answer."""
    port = free_port()
    started: list[StandIn] = []
    timer = threading.Timer(1.0, lambda: started.append(serve(StandIn(port))))
    timer.start()
    try:
        with LoopserveClient(f"http://127.0.0.1:{port}", wait=30) as client:
            began = time.monotonic()
            assert client.models().data[0].max_loops == 4
            assert time.monotonic() - began >= 0.5
    finally:
        timer.join()
        started[0].shutdown()


def test_a_refused_connection_fails_once_the_wait_is_over():
    with LoopserveClient(f"http://127.0.0.1:{free_port()}", wait=1) as client:
        began = time.monotonic()
        with pytest.raises(openai.APIConnectionError):
            client.models()
        assert 1 <= time.monotonic() - began < 10


def test_a_503_is_raised_at_once_not_retried():
    server = serve(StandIn(free_port(), status=503))
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with (
            LoopserveClient(url, wait=30) as client,
            pytest.raises(openai.InternalServerError) as error,
        ):
            client.models()
        assert error.value.status_code == 503
        assert len(server.bodies) == 1
    finally:
        server.shutdown()


def test_loops_travel_in_the_body_and_come_back_typed():
    server = serve(StandIn(free_port()))
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with LoopserveClient(url) as client:
            result = client.complete("The capital of France is", loops=3, max_tokens=2)
            default = client.complete("x", max_tokens=2)
        assert (result.usage.loops, result.usage.total_flops) == (3, 50)
        assert default.usage.loops == 1
        completions = [b for b in server.bodies if b is not None]
        assert [b.get("loops") for b in completions] == [3, None]
        assert {b["model"] for b in completions} == {"tiny"}  # the served model by default

        async def run_async() -> int:
            async with AsyncLoopserveClient(url) as client:
                return (await client.complete("x", loops=2, max_tokens=2)).usage.loops

        assert asyncio.run(run_async()) == 2
        assert server.bodies[-1]["loops"] == 2
    finally:
        server.shutdown()
