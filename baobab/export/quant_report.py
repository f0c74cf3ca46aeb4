"""Size, memory, speed and perplexity of an export against its quantized twins.

Definitions (one row per model directory):

* ``file_bytes``: size of its model.safetensors.
* ``weight_bytes``: bytes of its parameters and buffers in memory, tied tensors once.
* ``peak_mem_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` over loading the model
  and one forward on the fixed batch (the first val batch). On CPU, the growth of the peak
  resident set size of a fresh child process (``VmHWM`` of /proc/self/status, reset through
  /proc/self/clear_refs just after its imports) over load + that forward: the memory the model really costs,
  transient dequantized weights included; Linux only. ``None`` when ``measure_memory`` is False.
* ``tokens_per_s``: forward-pass throughput, the tokens scored in the perplexity pass
  (``batches x batch_size x seq_len``) over its wall time (no_grad, eval mode, after one
  warm-up forward). Compare rows of one run only.
* ``val_ppl``: exp of the mean next-token cross entropy over the first ``batches`` batches,
  in order, of ``TokenWindows(data_dir, "val", seq_len)``; ``ppl_change_pct`` is its change
  against the first (unquantized) row in %.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baobab.export.artifact import MODEL_FILE, read_config


def load_any(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load an export directory, quantized or not."""
    if read_config(path).get("quantization"):
        from baobab.export.quantize import load_quantized

        return load_quantized(path, device)
    from baobab.export.artifact import load_exported

    return load_exported(path, device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, tied tensors counted once."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _batch_indices(n_windows: int, batch_size: int, batches: int) -> list[np.ndarray]:
    starts = range(0, min(n_windows, batches * batch_size), batch_size)
    return [np.arange(s, min(s + batch_size, n_windows)) for s in starts]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data_dir: str | Path,
    seq_len: int = 256,
    batches: int = 20,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(val perplexity, forward tokens/s) over the first ``batches`` val batches, in order."""
    from baobab.data import TokenWindows

    windows = TokenWindows(data_dir, "val", seq_len)
    model.eval()
    x0, _ = windows.get_batch(np.arange(min(batch_size, len(windows))))
    model(x0.to(device))  # warm-up
    total, count, tokens, seconds = 0.0, 0, 0, 0.0
    for idx in _batch_indices(len(windows), batch_size, batches):
        x, y = windows.get_batch(idx)
        x, y = x.to(device), y.to(device)
        start = time.perf_counter()
        logits = model(x)  # (B, T, V)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += float(loss)
        count += y.numel()
        tokens += x.numel()
    return math.exp(min(total / count, 50.0)), tokens / max(seconds, 1e-9)


_CHILD = """
import json, sys
import numpy as np, torch
from baobab.data import TokenWindows
from baobab.export.quant_report import load_any
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB
path, data_dir, seq_len, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
w = TokenWindows(data_dir, "val", seq_len)
x, _ = w.get_batch(np.arange(min(batch_size, len(w))))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
model, _ = load_any(path)
with torch.no_grad():
    model(x)
print(json.dumps({"kib": status("VmHWM") - before}))
"""


def peak_memory(
    path: str | Path,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    device: str | torch.device = "cpu",
) -> int:
    """Peak bytes to load ``path`` and run one forward on the fixed batch (see module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        from baobab.data import TokenWindows

        w = TokenWindows(data_dir, "val", seq_len)
        x, _ = w.get_batch(np.arange(min(batch_size, len(w))))
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model, _ = load_any(path, device)
        with torch.no_grad():
            model(x.to(device))
        peak = torch.cuda.max_memory_allocated(device) - base
        del model
        return int(peak)
    args = [str(path), str(data_dir), str(seq_len), str(batch_size)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["kib"]) * 1024  # Linux: KiB


def quantization_report(
    fp32_dir: str | Path,
    quant_dirs: list[str | Path],
    data_dir: str | Path,
    seq_len: int = 256,
    batches: int = 20,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    measure_memory: bool = True,
    print_table: bool = False,
) -> list[dict[str, Any]]:
    """One row per model (``fp32_dir`` first, then ``quant_dirs``); see the module doc."""
    rows: list[dict[str, Any]] = []
    for path in [fp32_dir, *quant_dirs]:
        path = Path(path)
        model, config = load_any(path, device)
        quant = config.get("quantization") or {}
        ppl, tps = perplexity(model, data_dir, seq_len, batches, batch_size, device)
        rows.append(
            {
                "model": path.name,
                "bits": quant.get("bits"),
                "group_size": quant.get("group_size"),
                "file_bytes": (path / MODEL_FILE).stat().st_size,
                "weight_bytes": weight_bytes(model),
                "peak_mem_bytes": (
                    peak_memory(path, data_dir, seq_len, batch_size, device)
                    if measure_memory
                    else None
                ),
                "tokens_per_s": tps,
                "val_ppl": ppl,
            }
        )
        del model
    base = rows[0]["val_ppl"]
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["val_ppl"] - base) / base
    if print_table:
        print(format_report(rows))
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`quantization_report` rows."""

    def mib(b: int | None) -> str:
        return "-" if b is None else f"{b / 2**20:.2f}"

    head = f"{'model':<20} {'bits':>4} {'file MiB':>9} {'peak MiB':>9} {'tok/s':>10} {'val ppl':>9} {'Δppl %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        bits = "fp" if r["bits"] is None else str(r["bits"])
        lines.append(
            f"{r['model'][:20]:<20} {bits:>4} {mib(r['file_bytes']):>9} "
            f"{mib(r['peak_mem_bytes']):>9} {r['tokens_per_s']:>10.0f} {r['val_ppl']:>9.3f} "
            f"{r['ppl_change_pct']:>+7.2f}"
        )
    return "\n".join(lines)
