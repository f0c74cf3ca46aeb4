"""A local registry is a Hugging Face hub cache: huggingface_hub scans it and transformers
loads a pushed Llama-style and GPT-2-style model by repo id, offline, with baobab's logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from baobab.cli import main  # noqa: E402


def test_scan_cache_dir_and_from_pretrained_read_the_registry(exports, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = tmp_path / "registry"
    for kind, name in (("llama", "baobab/gpt-llama"), ("gpt2", "gpt-2ish")):
        assert main(["registry", "push", str(exports[kind][1]), f"{name}:champion",
                     "--registry", str(home)]) == 0  # fmt: skip
    assert main(["registry", "push", str(exports["mlp"][1]), "mlp", "--registry", str(home)]) == 0  # fmt: skip
    info = huggingface_hub.scan_cache_dir(home)
    assert info.warnings == []
    repos = {repo.repo_id: repo for repo in info.repos}
    assert set(repos) == {"baobab/gpt-llama", "gpt-2ish", "mlp"}
    for repo_id in ("baobab/gpt-llama", "gpt-2ish"):
        (revision,) = repos[repo_id].revisions
        assert revision.refs == {"main", "v1", "champion"}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
            f.file_name for f in revision.files
        }
    x = torch.randint(0, 259, (2, 16))
    for kind, repo_id, arch in (("llama", "baobab/gpt-llama", "LlamaForCausalLM"),
                                ("gpt2", "gpt-2ish", "GPT2LMHeadModel")):  # fmt: skip
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            repo_id, cache_dir=home, local_files_only=True
        ).eval()
        assert type(hf).__name__ == arch
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, exports[kind][0](x), rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(
        "baobab/gpt-llama", cache_dir=home, local_files_only=True
    )
    assert tok.encode("hi") == [104, 105]
