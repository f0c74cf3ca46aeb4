"""Device, precision, and the peak FLOP/s that MFU is measured against.

MFU (model FLOPs utilisation) is the model's training FLOPs per second over the peak FLOP/s
of the devices it ran on, for the dtype its matmuls compute in (``compute_dtype``). The one
definition (``mfu`` over ``peak_flops`` or a ``PeakMeter``) serves the progress bar,
``metrics.jsonl``, ``benchmarks/train_throughput.py`` and ``baobab plan``. The peak is:

- **a data-sheet number** for the GPUs in ``KNOWN_PEAKS`` (dense, without sparsity, per
  dtype). A device cannot beat its data sheet, so MFU <= 100% holds by definition for
  these, as long as the model's FLOP count counts only FLOPs it performs.
- **measured** otherwise, by a probe robust to load. On a CPU it is the best rate of a
  one-thread matmul in FLOPs per second *of that thread's CPU time*, times the threads
  torch computes with. CPU time stands still while other processes hold the core, so a
  busy machine barely moves it (here, under two busy processes, a wall-clock probe read
  2-4x low; the CPU-time probe within its quiet spread). It also bounds the training
  rate, which is why MFU cannot pass 100%: a step's F FLOPs, done by n threads in wall
  time W, thread i doing F_i in CPU time c_i <= W, give F/W <= sum_i F_i/c_i <= n*r,
  where r is the best FLOPs per CPU-second of one thread's matmul (one busy core turbos
  no lower and shares no cache, so its rate is no lower than a thread's under full load).
  The probe is repeated through the run at doubling intervals and the highest value kept,
  so a probe that ran unluckily (a co-runner on a sibling hyperthread, a stolen vCPU)
  is corrected: the peak only rises, toward r, never toward the training rate. On a GPU
  missing from the table the probe is wall-clock, repeated likewise; no
  CPU-time argument applies there, so add the GPU's data sheet to ``KNOWN_PEAKS``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import torch

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' data sheets, by the dtype the
# matmuls compute in; tf32 is fp32 input on tensor cores (torch's float32 matmul precision
# "high"/"medium"). Keys match torch.cuda.get_device_name() as whole words, in this order
# (the specific before the general: "H100 NVL" before "H100", "L40S" before "L40"). Where
# one name covers variants, the fastest variant's number keeps MFU an underestimate.
KNOWN_PEAKS: dict[str, dict[str, float]] = {
    "H200 NVL": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},
    "H100 NVL": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H100 PCIe": {"fp32": 51e12, "tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12},
    "H100": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "A10G": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "A10": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "L40S": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362.05e12, "fp16": 362.05e12},
    "L40": {"fp32": 90.5e12, "tf32": 90.5e12, "bf16": 181.05e12, "fp16": 181.05e12},
    "L4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
    "RTX 4090": {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12, "fp16": 330.3e12},
    "RTX 3090": {"fp32": 35.6e12, "tf32": 35.6e12, "bf16": 71e12, "fp16": 142e12},
    "V100": {"fp32": 16.4e12, "tf32": 16.4e12, "fp16": 130e12},  # no bf16 or tf32 units
    "T4": {"fp32": 8.1e12, "tf32": 8.1e12, "fp16": 65e12},  # no bf16 or tf32 units
    "MI300X": {"fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12},
    "MI250X": {"fp32": 95.7e12, "tf32": 95.7e12, "bf16": 383e12, "fp16": 383e12},
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fmt: skip
# First re-probe this many seconds after the first probe; each gap doubles up to the cap.
PROBE_FIRST_GAP_S, PROBE_MAX_GAP_S = 0.25, 600.0


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_deterministic() -> None:
    """Deterministic kernels only, so a run repeats bit for bit (``train.deterministic``).

    cuBLAS needs its workspace pinned before its first call (hence the environment
    variable, set early); an op without a deterministic kernel raises instead of
    silently varying.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``bf16`` (and ``auto`` on CUDA); fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(device: torch.device, precision: str) -> str:
    """The dtype a run's matmuls compute in for ``train.precision``: bf16 under autocast
    or bf16 parameters, tf32 for fp32 on a GPU that allows it, else fp32."""
    if precision in ("bf16", "bf16-params") or (precision == "auto" and device.type == "cuda"):
        return "bf16"
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def known_peak(device: torch.device, dtype: str) -> float | None:
    """The data-sheet peak FLOP/s of ``device`` for ``dtype``, or None if not in the table."""
    return known_peak_of(device_name(device), dtype) if device.type == "cuda" else None


def known_peak_of(name: str, dtype: str) -> float | None:
    """``KNOWN_PEAKS`` for a GPU name as torch reports it (``NVIDIA H100 80GB HBM3``)."""
    for key, peaks in KNOWN_PEAKS.items():
        if re.search(rf"(?<![\w-]){re.escape(key)}(?!\w)", name):
            return peaks.get(dtype)
    return None


def peak_flops(device: torch.device, dtype: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of one ``device`` for matmuls in ``dtype``
    (fp32, tf32, bf16, fp16): the data sheet where ``KNOWN_PEAKS`` has it, else one probe
    (see the module docstring; a ``PeakMeter`` keeps probing through a run)."""
    meter = PeakMeter(device, dtype)
    return meter.value, meter.source


def mfu(flops_per_s: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: ``flops_per_s`` achieved over ``devices`` devices of
    ``peak`` FLOP/s each (a fraction; under 1 whenever ``peak`` bounds the device)."""
    return flops_per_s / (peak * devices)


class PeakMeter:
    """The peak FLOP/s MFU divides by, for one device and dtype.

    ``given`` (``train.peak_flops``) or the data sheet fix it; otherwise it is measured at
    construction and, through ``refresh``, again at doubling intervals (0.25 s, 0.5 s, ... up
    to 10 minutes apart, each probe a few tens of milliseconds: about 1.5% of a run's first
    16 seconds, nothing after), keeping the highest.
    """

    def __init__(self, device: torch.device, dtype: str = "fp32", given: float | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
        self.device, self.dtype, self.probes = device, dtype, 0
        known = None if given else known_peak(device, dtype)
        if given:
            self.value, self.source = float(given), "train.peak_flops"
        elif known:
            self.value = known
            self.source = f"data sheet: {device_name(device)}, dense {dtype}"
        else:
            self.value, self._gap = 0.0, PROBE_FIRST_GAP_S
            self._probe()
        self.measured = not (given or known)

    def refresh(self) -> float:
        """The peak now, probing again first when a probe is due."""
        if self.measured and time.monotonic() >= self._due:
            self._probe()
        return self.value

    def _probe(self) -> None:
        if self.device.type == "cpu":
            threads = torch.get_num_threads()
            rate = threads * _thread_matmul_rate(DTYPES[self.dtype])
            how = f"best one-thread {self.dtype} matmul per CPU-second x {threads} threads"
        else:
            rate = _device_matmul_rate(self.device, DTYPES[self.dtype])
            how = f"best {self.dtype} matmul on {device_name(self.device)}, wall clock"
        self.value = max(self.value, rate)
        self.probes += 1
        self.source = f"measured: {how}, highest of {self.probes} probes"
        self._due = time.monotonic() + self._gap
        self._gap = min(2 * self._gap, PROBE_MAX_GAP_S)


def _thread_matmul_rate(dtype: torch.dtype, sizes=(256, 512), tries: int = 4) -> float:
    """Best FLOPs per second of the calling thread's CPU time of one-thread square matmuls
    (two sizes, since the fastest one depends on the caches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)  # never the training RNG
    best = 0.0
    try:
        for size in sizes:
            a = torch.randn(size, size, generator=generator).to(dtype)
            b = torch.randn(size, size, generator=generator).to(dtype)
            out = a @ b  # warm-up: first-call allocations and dispatch
            for _ in range(tries):
                start = time.thread_time()
                for _ in range(3):
                    torch.mm(a, b, out=out)
                spent = time.thread_time() - start
                if spent > 0:
                    best = max(best, 3 * 2 * size**3 / spent)
    finally:
        torch.set_num_threads(threads)
    return best


def _device_matmul_rate(device: torch.device, dtype: torch.dtype, tries: int = 5) -> float:
    """Best wall-clock FLOP/s of a square matmul on an accelerator."""
    size = 4096 if device.type == "cuda" else 2048
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    out = a @ b
    best = 0.0
    for _ in range(tries):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        _sync(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
