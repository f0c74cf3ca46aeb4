"""Typed configuration of a training run: one dataclass per component.

A recipe (``baobab/recipes/*.yaml``) is a ``RunConfig`` written as YAML; the CLI turns every
field into a dotted flag (``--optim.lr 3e-4``). Each dataclass validates itself when built,
so a bad value is refused with one sentence before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from baobab.models.lora import LoRAConfig
from baobab.optim import OptimConfig, ScheduleConfig
from baobab.parallel import BlockOptions, ParallelConfig

DATA_KINDS = ("tokens", "arrays", "images", "digits", "regression")
OBJECTIVES = ("auto", "causal_lm", "masked_lm", "classification", "regression")
PRECISIONS = ("auto", "fp32", "bf16", "bf16-params")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelSpec:
    """Which model to build.

    Args:
        name: a registered model name (``baobab models`` lists them), e.g. ``gpt-mini``.
        overrides: config fields to change from the named size, e.g. ``{"n_layer": 2}``.
        init: start from the weights in this directory instead of a fresh init: a baobab
            export, a checkpoint or run directory, or a Hugging Face Llama/GPT-2/BERT
            directory. Its config replaces ``name``'s; ``overrides`` may still change
            fields that keep the weights' shapes (e.g. dropout).
    """

    name: str = "gpt-mini"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None


@dataclass
class DistillConfig:
    """Knowledge distillation: the student learns from a teacher's logits as well as the labels.

    The training loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``, with
    both distributions softened by temperature T (Hinton et al., 2015); evaluation reports
    the student's plain label loss. Works for causal_lm and classification objectives.

    Args:
        teacher: the teacher model's directory (an export, a checkpoint or run directory, or
            a Hugging Face directory); unset: no distillation.
        temperature: softening temperature T of both distributions.
        alpha: weight of the distillation term; 1 - alpha weights the hard-label loss.
    """

    teacher: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _check(
            self.temperature > 0, f"distill.temperature must be positive, got {self.temperature}"
        )
        _check(0 <= self.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.alpha}")


@dataclass
class DataConfig:
    """Where training samples come from and how they are batched.

    Args:
        kind: tokens (a prepared corpus), arrays (.npz or .npy), images (a folder of class
            sub-folders), digits (scikit-learn's bundled 8x8 digits) or regression (synthetic
            linear data, the seed's example).
        path: tokens: the prepared directory; arrays: the .npz file or the inputs .npy;
            images: the root folder.
        targets_path: arrays: the targets .npy when ``path`` is an inputs .npy.
        source: tokens only: ``stdlib`` prepares the Python standard library's source into
            ``path`` when it holds no corpus yet.
        vocab_size: tokenizer size when ``source`` prepares a corpus.
        seq_len: tokens per training window.
        batch_size: samples per micro-batch on each data-parallel rank.
        val_fraction: share of samples held out for evaluation (non-token kinds).
        num_samples: regression: how many synthetic samples to make.
        image_size: images: side length images are resized to.
    """

    kind: str = "tokens"
    path: str | None = "data/stdlib-4096"
    targets_path: str | None = None
    source: str | None = None
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    val_fraction: float = 0.1
    num_samples: int = 1000
    image_size: int = 32

    def __post_init__(self) -> None:
        _check(
            self.kind in DATA_KINDS,
            f"unknown data.kind '{self.kind}'; choose one of: {', '.join(DATA_KINDS)}",
        )
        _check(
            self.source in (None, "stdlib"),
            f"unknown data.source '{self.source}'; the only source is: stdlib",
        )
        _check(self.seq_len >= 1, f"data.seq_len must be at least 1, got {self.seq_len}")
        _check(self.batch_size >= 1, f"data.batch_size must be at least 1, got {self.batch_size}")
        _check(
            0 <= self.val_fraction < 1,
            f"data.val_fraction must be in [0, 1), got {self.val_fraction}",
        )
        _check(
            self.num_samples >= 2, f"data.num_samples must be at least 2, got {self.num_samples}"
        )
        needs_path = self.kind in ("tokens", "arrays", "images")
        _check(
            not needs_path or self.path is not None,
            f"data.path is required for data.kind={self.kind}",
        )


@dataclass
class TrainerConfig:
    """How the training loop runs.

    Args:
        run_dir: directory for checkpoints, metrics.jsonl and the resolved config.
        objective: auto (from the model family), causal_lm, masked_lm, classification or
            regression.
        max_steps: stop after this many optimizer updates.
        max_epochs: stop after this many passes over the training data.
        target_loss: also stop as soon as the training loss is at or below this value.
        grad_accum: micro-batches per optimizer update.
        precision: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16 (autocast) or
            bf16-params (FSDP keeps fp32 master weights and computes with bf16 copies;
            gradients are reduced in fp32; needs parallel.dp_shard > 1).
        device: auto (CUDA, then MPS, then CPU) or a torch device string.
        seed: seeds model initialisation, data order and sampling.
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batches: evaluate on this many global batches (data.batch_size samples per
            data-parallel rank each) at fixed positions spread over the whole validation
            split, drawn with train.seed: the same samples at every evaluation (0: the whole
            split, in order). The log shows the tokens (or samples) covered as val_tokens.
        save_every: checkpoint every this many steps (0: only at the end).
        keep_last: how many checkpoints to keep.
        async_save: write checkpoints in the background while training goes on.
        log_every: write a metrics line every this many steps.
        resume: continue from the newest checkpoint in run_dir.
        overwrite: start over in a run_dir that already holds checkpoints.
        progress: show a progress bar.
        peak_flops: the device's peak FLOP/s for MFU; null takes a known GPU's data sheet
            for the run's compute dtype, else a load-robust probe repeated through the run
            (``baobab.train.device``).
        mask_prob: masked LM: share of tokens to mask.
        threads: CPU threads for torch (0 keeps torch's default).
        deterministic: use only deterministic kernels (``torch.use_deterministic_algorithms``),
            so two runs with the same seed and layout give bit-identical losses; CPU runs
            are deterministic already, CUDA runs get slower.
    """

    run_dir: str = "runs/default"
    objective: str = "auto"
    max_steps: int | None = None
    max_epochs: int | None = None
    target_loss: float | None = None
    grad_accum: int = 1
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 0
    keep_last: int = 3
    async_save: bool = False
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    peak_flops: float | None = None
    mask_prob: float = 0.15
    threads: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check(
            self.objective in OBJECTIVES,
            f"unknown train.objective '{self.objective}'; choose one of: {', '.join(OBJECTIVES)}",
        )
        _check(
            self.precision in PRECISIONS,
            f"unknown train.precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}",
        )
        for key in ("max_steps", "max_epochs"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"train.{key} must be at least 1, got {value}")
        for key in ("grad_accum", "keep_last", "log_every"):
            _check(
                getattr(self, key) >= 1, f"train.{key} must be at least 1, got {getattr(self, key)}"
            )
        for key in ("eval_every", "eval_batches", "save_every", "threads"):
            _check(
                getattr(self, key) >= 0, f"train.{key} must be 0 or more, got {getattr(self, key)}"
            )
        _check(0 < self.mask_prob < 1, f"train.mask_prob must be in (0, 1), got {self.mask_prob}")
        _check(
            self.peak_flops is None or self.peak_flops > 0,
            f"train.peak_flops must be positive, got {self.peak_flops}",
        )
        _check(
            not (self.resume and self.overwrite),
            "train.resume and train.overwrite cannot both be set",
        )


@dataclass
class FaultConfig:
    """How a run meets failures: hangs, bad numbers (see ``baobab/train/faults.py``).

    Restarts after a crash are torchrun's (``baobab train --max-restarts N``); a restarted
    job resumes by itself from the newest complete checkpoint.

    Args:
        hang_timeout: seconds any one phase of a distributed run (a step's data loading,
            forward/backward, an all-reduce, an evaluation, a checkpoint save) may last
            before every rank exits non-zero naming the stalled rank and the operation; 0
            turns the watchdog off and leaves only the process group's own timeout.
        max_skipped_steps: stop the run after this many consecutive skipped updates (a
            non-finite loss or gradient norm, or a loss spike).
        spike_factor: skip the update when the loss exceeds this multiple of the mean of
            the last ``spike_window`` good steps' losses; null turns the guard off.
        spike_window: how many recent good losses the spike guard averages; it acts once
            it has seen that many.
    """

    hang_timeout: float = 600.0
    max_skipped_steps: int = 3
    spike_factor: float | None = None
    spike_window: int = 50

    def __post_init__(self) -> None:
        _check(
            self.hang_timeout >= 0, f"fault.hang_timeout must be 0 or more, got {self.hang_timeout}"
        )
        _check(
            self.max_skipped_steps >= 1,
            f"fault.max_skipped_steps must be at least 1, got {self.max_skipped_steps}",
        )
        _check(
            self.spike_factor is None or self.spike_factor > 1,
            f"fault.spike_factor must be greater than 1, got {self.spike_factor}",
        )
        _check(
            self.spike_window >= 1,
            f"fault.spike_window must be at least 1, got {self.spike_window}",
        )


@dataclass
class RunConfig:
    """A whole training run: what a recipe file holds.

    ``lora`` (unset: off) swaps the chosen linear layers for LoRA adapters after the model
    is built or loaded; only the adapters train (``baobab finetune --lora.rank 8``).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    blocks: BlockOptions = field(default_factory=BlockOptions)
    lora: LoRAConfig | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Rebuild a RunConfig from its ``dataclasses.asdict`` form (e.g. checkpoint metadata)."""
        parts = {
            "model": ModelSpec,
            "data": DataConfig,
            "optim": OptimConfig,
            "schedule": ScheduleConfig,
            "train": TrainerConfig,
            "parallel": ParallelConfig,
            "blocks": BlockOptions,
            "distill": DistillConfig,
            "fault": FaultConfig,
        }
        kwargs = {key: kind(**values[key]) for key, kind in parts.items() if key in values}
        if values.get("lora"):
            kwargs["lora"] = LoRAConfig(**values["lora"])
        if "optim" in values:
            kwargs["optim"] = dataclasses.replace(
                kwargs["optim"], betas=tuple(values["optim"]["betas"])
            )
        return cls(**kwargs)
