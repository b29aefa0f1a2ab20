"""Start a real server process (`loopserve serve`, or stock vLLM's) on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        # The engine's processes too, which a parent killed mid-start-up leaves behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_server(args: list[str], log_path: str, timeout: float = 600.0) -> ServerProcess:
    """Start `loopserve serve ARGS`; return once /health answers 200."""
    command = [sys.executable, "-m", "loopserve.server.cli", "serve"]
    return start_process(command, args, log_path, timeout)


def start_stock_vllm(args: list[str], log_path: str, timeout: float = 600.0) -> ServerProcess:
    """Start stock vLLM's OpenAI server (loopserve's plugin loaded, nothing looped)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return start_process(command, args, log_path, timeout)


def start_process(
    command: list[str], args: list[str], log_path: str, timeout: float = 600.0
) -> ServerProcess:
    """Start `COMMAND --port P ARGS` on a free port; return once /health answers 200
    (vLLM opens the port only when the engine is ready)."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    process = subprocess.Popen(
        [*command, "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        start_new_session=True,  # one process group: stop() ends the engine's processes too
    )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"server not healthy after {timeout}s:\n{server.log()[-4000:]}")
