"""Convert a GGUF file shipped in a Python package into a Hugging Face folder (safetensors + tokenizer).

Run by the embedded vLLM server's venv python, by path (``python -I gguf_convert.py PACKAGE GGUF_FILE OUT``):
that venv has torch, transformers and gguf, not this project. So this module imports nothing of the project,
and torch and transformers only inside :func:`main`. It prints a line per stage: the set-up's progress line
shows the last one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: this file, as the command line runs it
SCRIPT = Path(__file__).resolve()


def command(python: Path, package: str, gguf_file: str, out: Path) -> list[str]:
    """The command line converting ``gguf_file`` of ``package`` into ``out`` with ``python`` (isolated mode: the
    script's folder is not put on ``sys.path``, so the project's modules cannot shadow the venv's)."""
    return [str(python), "-I", str(SCRIPT), package, gguf_file, str(out)]


def main(argv: list[str]) -> None:
    package, gguf_file, out = argv[0], argv[1], Path(argv[2])
    print("importing torch and transformers", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(importlib.util.find_spec(package).origin).parent
    print("reading the tokenizer from the GGUF file", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    print("reading and dequantizing the weights", flush=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.bfloat16)
    # transformers dequantizes GGUF weights on load; drop the marker so the result saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    print("saving safetensors", flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1:])
