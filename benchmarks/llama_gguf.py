"""A baobab Llama as GGUF, written by llama.cpp's own ``convert_hf_to_gguf.py``.

``baobab hf export`` writes a ``LlamaForCausalLM`` directory whose tokenizer is a
``tokenizers`` byte-level BPE (``tokenizer.json``, no ``tokenizer.model``). llama.cpp's
converter reads such a directory with two steps that refuse it, and this shim replaces just
those two, then runs the converter's ``main`` unchanged (weights, q8_0 quantization and
metadata are llama.cpp's own):

1. ``LlamaModel.set_vocab`` tries SentencePiece (``tokenizer.model``) and the Llama-HF
   vocabulary first; here it goes straight to the GPT-2-style BPE path (``_set_vocab_gpt2``:
   the token list, merges and special ids from ``tokenizer.json``);
2. ``get_vocab_base_pre`` fingerprints the pre-tokenizer by hashing the ids of a test string
   and refuses unknown hashes; here it answers ``gpt-2``. baobab's BPE splits no text before
   merging, so llama.cpp's own text tokenization would differ from baobab's: the benchmark
   sends prompts as token ids, and only llama.cpp's detokenizer (byte-level, the same) runs.

It works with both converter layouts: the single ``convert_hf_to_gguf.py`` and the one that
imports its model classes from a ``conversion`` package beside it.

    python benchmarks/llama_gguf.py LLAMA_CPP_DIR HF_DIR OUT.gguf {f32,q8_0}
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path


def convert(llama_cpp_dir: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    """Write ``out`` (GGUF of ``outtype``) from ``hf_dir`` in a child process (the converter
    puts its own ``gguf`` package first on ``sys.path``); raises with its output on failure."""
    cmd = [sys.executable, __file__, str(llama_cpp_dir), str(hf_dir), str(out), outtype]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {(run.stdout + run.stderr)[-2000:]}")
    return out


def _patched_converter(llama_cpp_dir: Path):
    """llama.cpp's converter module with the two tokenizer steps replaced (module doc)."""
    sys.path[:0] = [str(llama_cpp_dir), str(llama_cpp_dir / "gguf-py")]
    converter = importlib.import_module("convert_hf_to_gguf")
    if hasattr(converter, "get_model_class"):  # the layout with a conversion package
        llama = converter.get_model_class("LlamaForCausalLM")
        text_model = importlib.import_module("conversion.base").TextModel
    else:
        llama = converter.ModelBase.from_model_architecture("LlamaForCausalLM")
        text_model = converter.TextModel
    text_model.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    llama.set_vocab = text_model._set_vocab_gpt2
    return converter


def main() -> None:
    llama_cpp_dir, hf_dir, out, outtype = sys.argv[1:5]
    converter = _patched_converter(Path(llama_cpp_dir))
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype]
    converter.main()


if __name__ == "__main__":
    main()
