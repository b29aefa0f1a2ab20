"""The `loopserve` command's start-up checks: bad loop plans end with a message, not a trace."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loopserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loopserve.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_default_model_prints_the_checkpoint(model_path):
    result = loopserve("default-model")
    assert result.returncode == 0
    assert result.stdout.strip() == model_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loop-block", "28:40"], "0 <= start < end <= num_layers (30)"),
        (["--loop-block", "17:13"], "0 <= start < end"),
        (["--loop-block", "middle"], "START:END"),
        (["--max-loops", "0"], "max_loops must be >= 1"),
        (["--default-loops", "5"], "default_loops must be in [1, max_loops=4]"),
    ],
)
def test_serve_refuses_bad_loop_plans(model_path, args, message, capsys, monkeypatch):
    """In this process (the console script is `main`, run above): a refused plan
    returns 2 before vLLM starts, so no subprocess start-up per case."""
    from loopserve.server.cli import main

    monkeypatch.setenv("VLLM_PLUGINS", "")  # `serve` names its plugin there; restored after
    assert main(["serve", "--port", "1", *args]) == 2
    assert message in capsys.readouterr().err
