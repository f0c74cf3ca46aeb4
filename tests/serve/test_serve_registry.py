"""``baobab serve models:/NAME@ALIAS``: a registry name serves what its directory serves, and a
tampered blob is refused before the server listens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from openai import OpenAI
from serving import TEST_ENGINE, free_port, wait_until_healthy

from baobab.cli import main

REPO = Path(__file__).resolve().parents[2]


def _push(export: Path, registry: Path, name: str, monkeypatch) -> None:
    monkeypatch.setenv("BAOBAB_REGISTRY", str(registry))
    assert main(["registry", "push", str(export), name]) == 0
    assert main(["registry", "alias", f"{name}@champion", "1"]) == 0


def test_a_registry_name_serves_what_its_directory_serves(
    lm_export, lm_server, tmp_path, monkeypatch
):
    registry = tmp_path / "registry"
    _push(lm_export, registry, "reciter", monkeypatch)
    port = free_port()
    command = [sys.executable, "-m", "baobab", "serve", "models:/reciter@champion",
               "--port", str(port), "--log_level", "warning",
               "--engine.kv_cache_memory_gib", str(TEST_ENGINE["kv_cache_memory_gib"])]  # fmt: skip
    env = {**os.environ, "BAOBAB_REGISTRY": str(registry), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url)
        texts = []
        for base in (url, lm_server.url):
            client = OpenAI(base_url=f"{base}/v1", api_key="unused")
            out = client.completions.create(model="", prompt="baobab", max_tokens=24, temperature=0)
            texts.append(out.choices[0].text)
        assert texts[0] == texts[1] and texts[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_tampered_blob_is_refused_before_serving(lm_export, tmp_path, monkeypatch, capsys):
    registry = tmp_path / "registry"
    _push(lm_export, registry, "reciter", monkeypatch)
    blob = max((registry / "models--reciter" / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the largest file (the weights)
    blob.write_bytes(bytes(data))
    assert main(["serve", "models:/reciter@champion", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0], err
