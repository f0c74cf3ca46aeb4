"""Does llama.cpp run baobab's GGUF export as baobab does? Greedy tokens, side by side.

Each model is exported with ``baobab export --format gguf`` (``baobab.export.gguf``) as
f32, f16 and q8_0; ``llama-server`` (a llama.cpp built from source) serves each file on
loopback and is asked, on llama.cpp's native ``/completion`` endpoint, for ``--tokens``
greedy tokens (``temperature`` 0, ``ignore_eos``) after a fixed prompt sent as baobab's
token ids; llama.cpp's own tokenization of the prompt text (``/tokenize``) is compared with
baobab's too. baobab's reference is
``baobab.models.sampling.generate`` with temperature 0 on the float32 model. A row reports
how many of the tokens are equal and where the first difference is, if any: f32 must match
all of them; f16 and q8_0 round the weights, so a near tie may flip a late token there:
then llama.cpp's tokens are also compared with baobab's on the file's own weights
(``model_from_gguf``: dequantized by the ``gguf`` package), which rounded the same way.
A control row writes f32 without llama.cpp's q/k permutation (rope in the wrong layout):
it must differ, or the check would prove nothing.

Models: the quickstart run (``--run``, default ``runs/quickstart``: a trained gpt-mini, read
from a copy) when present, and a random gpt-mini (seed 0, byte tokenizer):
greedy equality holds for random weights too.

llama-server: ``$BAOBAB_LLAMA_SERVER``, else ``build/bin/llama-server`` under
``$BAOBAB_LLAMA_CPP_DIR`` (a llama.cpp source tree built with cmake); with neither the
script says so and exits 0.

    python benchmarks/gguf_llama_check.py [--tokens 48] [--run runs/quickstart]

Results: a table on stdout and ``benchmarks/results/gguf_llama_check.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from unittest.mock import patch

import torch
from serve_peers import LLAMA_CPP_DIR_ENV, LLAMA_SERVER_ENV, start_llama_server, stop

from baobab import models
from baobab.data import byte_tokenizer
from baobab.data.tokenizer import Tokenizer
from baobab.export import gguf as gguf_export
from baobab.export import save_exported
from baobab.export.gguf import GGUF_FILE, GGUF_TYPES, export_gguf, model_from_gguf
from baobab.export.open import open_model
from baobab.models.sampling import generate
from baobab.serve.chat import DEFAULT_TEMPLATE

RESULTS = Path(__file__).parent / "results"
CONTROL = "f32, q/k unpermuted"  # a control row: the check must catch a wrong rope layout
PROMPT = "class Parser:\n    def __init__(self, text):\n        self."


def find_llama_server() -> Path | None:
    """The llama-server binary (module docstring), or None."""
    if os.environ.get(LLAMA_SERVER_ENV):
        candidates = [Path(os.environ[LLAMA_SERVER_ENV])]
    else:
        root = os.environ.get(LLAMA_CPP_DIR_ENV)
        candidates = [Path(root) / "build" / "bin" / "llama-server"] if root else []
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def model_dirs(work: Path, run: Path) -> dict[str, Path]:
    """name -> a model directory export_gguf reads (module docstring)."""
    dirs = {}
    if run.is_dir():  # a copy: nothing here may touch the run
        dirs["gpt-mini (quickstart, trained)"] = Path(shutil.copytree(run, work / "quickstart"))
    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = models.get_config("gpt-mini", vocab_size=tok.vocab_size)
    model = models.build_model(cfg)
    with torch.no_grad():  # at its init a random gpt-mini repeats one token; this one varies
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    described = {"name": "gpt-mini", "family": "gpt", "config": dataclasses.asdict(cfg)}
    tok_file = tok.save(work / "byte-tokenizer.json")
    dirs["gpt-mini (random, seed 0)"] = save_exported(
        model, work / "random", described, "causal_lm", None, tok_file
    )
    return dirs


def llama_greedy(base: str, prompt: list[int], n: int) -> list[int]:
    """llama-server's ``n`` greedy token ids after ``prompt`` (ids)."""
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True,
            "return_tokens": True, "cache_prompt": False}  # fmt: skip
    return [int(t) for t in _post(base, "/completion", body)["tokens"]]


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def check(name: str, source: Path, binary: Path, work: Path, n: int) -> list[dict]:
    """One row per GGUF type: llama.cpp's greedy tokens against baobab's."""
    opened = open_model(source)
    tok = Tokenizer.load(opened.tokenizer_file)
    prompt = tok.encode(PROMPT)
    ours = generate(opened.model.float(), prompt, n, temperature=0.0)
    context = len(prompt) + n + 8
    rows = []
    for gguf_type in (*GGUF_TYPES, CONTROL):
        out = work / f"{len(os.listdir(work))}-{gguf_type}"
        if gguf_type == CONTROL:  # q/k left in rotate_half order: llama.cpp must then differ
            with patch.object(gguf_export, "to_gguf_rope", lambda w, n_head: w):
                export_gguf(source, out, "f32", DEFAULT_TEMPLATE)
        else:
            export_gguf(source, out, gguf_type, DEFAULT_TEMPLATE)
        server, base = start_llama_server(str(binary), out / GGUF_FILE, 1, context)
        try:
            theirs = llama_greedy(base, prompt, n)
            tokenized = _post(base, "/tokenize", {"content": PROMPT})["tokens"] == prompt
        finally:
            stop(server)
        same = [a == b for a, b in zip(ours, theirs, strict=False)]
        first = same.index(False) if False in same else None
        # baobab on the file's own (rounded, dequantized) weights: what llama.cpp should match
        # when rounding flips a near tie
        rounded = generate(model_from_gguf(out / GGUF_FILE, opened.model.cfg), prompt, n, 0.0)
        rows.append({
            "model": name, "gguf_type": gguf_type, "prompt_tokens": len(prompt), "tokens": n,
            "equal": sum(same) if len(theirs) == n else 0, "first_difference": first,
            "distinct_tokens": len(set(ours)), "llama_cpp_tokenizes_prompt_alike": tokenized,
            "equal_to_baobab_on_file_weights": sum(a == b for a, b in zip(rounded, theirs)),
            "baobab": ours, "llama_cpp": theirs, "baobab_text": tok.decode(ours),
            "llama_cpp_text": tok.decode(theirs),
        })  # fmt: skip
        print(
            f"{name:32} {gguf_type:18} {rows[-1]['equal']:3}/{n} equal"
            + (f", first difference at {first}" if first is not None else "")
            + f"; {rows[-1]['equal_to_baobab_on_file_weights']}/{n} equal to baobab on the "
            f"file's weights; prompt tokenized alike: {tokenized}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    binary = find_llama_server()
    if binary is None:
        print(
            f"llama.cpp: no llama-server found (set {LLAMA_SERVER_ENV}, or {LLAMA_CPP_DIR_ENV} to "
            "a llama.cpp source tree built with cmake's llama-server target); nothing checked"
        )
        sys.exit(0)
    print(f"llama-server: {binary.name} from a llama.cpp build; prompt {PROMPT!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in model_dirs(Path(tmp), args.run).items():
            rows += check(name, source, binary, Path(tmp), args.tokens)
    print(f"\n| model | GGUF | distinct tokens | equal to baobab's (of {args.tokens}) | "
          "first difference | equal to baobab on the file's weights | "
          "prompt tokenized alike |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        first = "none" if r["first_difference"] is None else f"token {r['first_difference']}"
        print(f"| {r['model']} | {r['gguf_type']} | {r['distinct_tokens']} | {r['equal']} | "
              f"{first} | {r['equal_to_baobab_on_file_weights']} | "
              f"{'yes' if r['llama_cpp_tokenizes_prompt_alike'] else 'no'} |")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "gguf_llama_check.json"
    out.write_text(
        json.dumps({"prompt": PROMPT, "tokens": args.tokens, "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
