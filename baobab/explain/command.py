"""``baobab explain MODEL_DIR``: explain a model's output and write the report directory.

Reads any model directory ``baobab generate`` reads (an export, a checkpoint or run
directory, a Hugging Face import, a LoRA-merged fine-tune), runs :func:`baobab.explain.
explain` with a progress bar counting its work units, and writes ``--out`` with
:func:`baobab.explain.report.write_report`. Image and vector models read ``--inputs``:
``.npy`` arrays ((N, F) vectors, (N, C, H, W) or (N, H, W) images) or image files, decoded
and resized as training and serving preprocess them (``baobab.data.arrays.decode_image``).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baobab.data.arrays import IMAGE_EXTENSIONS, decode_image
from baobab.explain import api
from baobab.explain.report import check_out_dir, write_report
from baobab.explain.types import ExplainError

TEXT_FAMILIES = ("gpt", "lstm", "bert")
DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


@dataclass
class ExplainConfig:
    """Where and how the explanation runs.

    Args:
        device: torch device the model runs on: "cpu", "cuda" (or "cuda:N") or "mps".
        internal_batch_size: integration steps evaluated per forward pass (memory vs speed).
    """

    device: str = "cpu"
    internal_batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or DEVICE.fullmatch(self.device) is None:
            raise ExplainError(
                f"explain.device must be cpu, cuda, cuda:N or mps; got {self.device!r}."
            )
        if isinstance(self.internal_batch_size, bool) or self.internal_batch_size < 1:
            raise ExplainError(
                f"explain.internal_batch_size must be at least 1; got {self.internal_batch_size}."
            )

    def torch_device(self) -> torch.device:
        """The device, once this machine is known to have it (ExplainError otherwise)."""
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ExplainError("explain.device is cuda but torch sees no CUDA GPU; use cpu.")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ExplainError(
                f"explain.device is {self.device} but torch sees "
                f"{torch.cuda.device_count()} CUDA GPU(s)."
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ExplainError("explain.device is mps but this machine has no MPS; use cpu.")
        return device


def explain_command(
    model_dir: str,
    /,
    out: str = "runs/explain",
    prompt: str = "",
    target: str = "",
    contrast: str = "",
    completion: str = "",
    max_tokens: int = 0,
    inputs: list[str] | None = None,
    labels: list[int] | None = None,
    methods: str = "ig",
    ig_steps: int = 512,
    max_delta: float = 0.05,
    top_k: int = 5,
    attention: bool = True,
    progress: bool = True,
    explain: ExplainConfig = ExplainConfig(),  # noqa: B008 (never mutated: replaced below)
) -> Path:
    """Explain why a model said what it said: figures, an HTML report and JSON in --out.

    Args:
        model_dir: an export, a checkpoint or run directory, or a Hugging Face directory.
        out: the directory to write (explanation.json, PNG figures, report.html); an
            earlier report there is replaced, any other non-empty directory refused.
        prompt: the text a language model reads (bert: with <|mask|> where it predicts).
        target: explain the log-probability of this text after the prompt (default: the
            model's own next token).
        contrast: explain log p(target) - log p(contrast): why the target rather than this.
        completion: a text the model produced after the prompt; each token is explained.
        max_tokens: generate this many tokens greedily and explain each in turn.
        inputs: for image and vector models: .npy arrays or image files (PNG, JPEG, ...).
        labels: the class explained for each input (default: the predicted class).
        methods: comma-separated attribution methods: ig, grad_x_input, occlusion.
        ig_steps: integration steps of integrated gradients (raise it when refused for
            its convergence delta).
        max_delta: refuse integrated gradients whose convergence delta exceeds this.
        top_k: tokens per position in the logit lens.
        attention: keep the attention maps (gpt) in the report and its JSON.
        progress: show a progress bar of the work (integration steps x tokens).
        explain: device and batching.
    """
    # Texts are plain ``str`` flags, "" meaning none: jsonargparse would read an optional
    # string as YAML, so that --target " #" (a comment) or "null" would become None.
    prompt, target, contrast, completion = (
        t or None for t in (prompt, target, contrast, completion)
    )
    if not isinstance(explain, ExplainConfig):  # the CLI hands nested flags over as a namespace
        explain = ExplainConfig(**(explain if isinstance(explain, dict) else vars(explain)))
    method_list = api.check_methods(methods)
    for name, value in (("ig_steps", ig_steps), ("top_k", top_k)):
        if value < 1:
            raise ExplainError(f"--{name} must be at least 1; got {value}.")
    if max_tokens < 0:
        raise ExplainError(f"--max_tokens must be 0 or more; got {max_tokens}.")
    check_out_dir(out, [model_dir])  # refuse a bad --out before any work
    device = explain.torch_device()
    from baobab.export.open import open_model
    from baobab.registry import resolve_model_dir

    opened = open_model(resolve_model_dir(model_dir))
    family = opened.described.get("family") or ""
    model = opened.model.to(device).eval()
    tokenizer = None
    batch = None
    if family in TEXT_FAMILIES:
        if inputs:
            raise ExplainError(f"a {family} model is explained from --prompt, not --inputs.")
        if prompt is None:
            raise ExplainError(f"a {family} model needs --prompt TEXT to explain.")
        if opened.tokenizer_file is None:
            raise ExplainError(f"'{model_dir}' has no tokenizer.json to encode the prompt with.")
        from baobab.data import Tokenizer

        tokenizer = Tokenizer.load(opened.tokenizer_file)
        total = text_units(
            tokenizer, family, prompt, target, completion, max_tokens, method_list, ig_steps
        )
    else:
        if not inputs:
            raise ExplainError(f"a {family} model needs --inputs (.npy arrays or image files).")
        batch = load_inputs(model, family, inputs).to(device)
        total = input_units(model, batch, method_list, ig_steps)
    args = dict(
        out=out,
        prompt=prompt,
        target=target,
        contrast=contrast,
        completion=completion,
        max_tokens=max_tokens,
        inputs=inputs,
        labels=labels,
        methods=",".join(method_list),
        ig_steps=ig_steps,
        max_delta=max_delta,
        top_k=top_k,
        attention=attention,
        **{"explain.device": explain.device},
        **{"explain.internal_batch_size": explain.internal_batch_size},
    )
    with _progress_bar(total, progress) as bar:
        result = api.explain(
            model,
            tokenizer,
            prompt=prompt,
            target=target,
            contrast=contrast,
            completion=completion,
            max_tokens=max_tokens,
            inputs=batch,
            labels=labels,
            methods=method_list,
            ig_steps=ig_steps,
            max_delta=max_delta,
            top_k=top_k,
            internal_batch_size=explain.internal_batch_size,
            progress=bar.update,
        )
        bar.finish()
    if not attention and getattr(result, "attention", None) is not None:
        result.attention = None
    names = _label_names(model_dir)
    for item in getattr(result, "items", []):
        if item.label_name is None and names and item.label is not None:
            item.label_name = names[item.label] if 0 <= item.label < len(names) else None
    meta = {
        "model_dir": str(model_dir),
        "model": opened.described.get("name"),
        "family": family,
        "source": opened.source,
        "label_names": names,
        "command": command_line(model_dir, args),
        "args": {k: v for k, v in args.items() if v is not None},
    }
    written = write_report(result, out, meta)
    _summary(result, written)
    return written


def command_line(model_dir: str, args: dict[str, Any]) -> str:
    """The ``baobab explain`` line that asks for ``args`` (flags at their defaults left out)."""
    defaults = {
        name: param.default for name, param in inspect.signature(explain_command).parameters.items()
    }
    defaults.update({f"explain.{k}": v for k, v in vars(ExplainConfig()).items()})
    parts = ["baobab", "explain", model_dir]
    for name, value in args.items():
        if value is None or value == defaults.get(name):
            continue
        if isinstance(value, list):
            parts += [item for v in value for item in (f"--{name}+", str(v))]
        else:
            parts += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(parts)


def text_units(
    tokenizer: Any,
    family: str,
    prompt: str,
    target: str | None,
    completion: str | None,
    max_tokens: int,
    methods: list[str],
    ig_steps: int,
) -> int:
    """The progress bar's total for a text explanation: :func:`api.planned_units` over the
    context of each explained token (it grows by one per generated token; greedy
    generation may stop early at end-of-text, and the bar then ends full anyway)."""
    prompt_ids = tokenizer.encode(prompt, allow_special=family == "bert")
    context = max(len(prompt_ids), 1)
    if target is None and completion is not None and family != "bert":
        steps = max(len(tokenizer.encode(completion)), 1)
    elif target is None and family != "bert":
        steps = max(max_tokens, 1)
    else:
        steps = 1
    return api.planned_units(methods, ig_steps, [context + i for i in range(steps)])


def input_units(
    model: torch.nn.Module, batch: torch.Tensor, methods: list[str], ig_steps: int
) -> int:
    """The progress bar's total for image and vector inputs (the vision half counts it)."""
    from baobab.explain.vision import input_work as planned

    return planned(model, tuple(batch.shape), methods, ig_steps)


class _Bar:
    """tqdm over work units, or a counter when progress is off; ``finish`` fills it."""

    def __init__(self, total: int, show: bool) -> None:
        from tqdm.auto import tqdm

        self.tqdm = tqdm(total=total, desc="explain", unit="step", disable=not show)

    def update(self, units: int) -> None:
        self.tqdm.update(units)

    def finish(self) -> None:
        # The total is an estimate: end at 100% whether the work fell short or ran over.
        if self.tqdm.n > self.tqdm.total:
            self.tqdm.total = self.tqdm.n
        self.tqdm.update(self.tqdm.total - self.tqdm.n)
        self.tqdm.refresh()

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tqdm.close()


def _progress_bar(total: int, show: bool) -> _Bar:
    return _Bar(max(int(total), 1), show)


def image_shape(model: torch.nn.Module, family: str) -> tuple[int, int] | None:
    """(channels, side) of the images ``model`` classifies, or None for a vector model."""
    cfg = model.cfg
    if family == "resnet":
        return cfg.in_channels, cfg.image_size
    if family == "mlp" and getattr(cfg, "task", "") == "classification":
        for channels in (1, 3):  # a square grey or RGB image, flattened in (C, H, W) order
            side = math.isqrt(cfg.in_features // channels)
            if channels * side * side == cfg.in_features:
                return channels, side
    return None


def load_inputs(model: torch.nn.Module, family: str, paths: list[str]) -> torch.Tensor:
    """The rows of every file in ``paths``, stacked: (N, C, H, W) images for an image
    classifier, (N, F) vectors for a vector model (ExplainError for what does not fit)."""
    shape = image_shape(model, family)
    rows = []
    for index, name in enumerate(paths):
        path = Path(name)
        if not path.is_file():
            raise ExplainError(f"--inputs file '{path}' does not exist.")
        if path.suffix.lower() == ".npy":
            try:
                array = np.load(path, allow_pickle=False)  # never unpickle a user's file
            except ValueError:
                raise ExplainError(f"'{path}' is not a numeric .npy array.") from None
            rows.append(_fit_array(array, shape, model, path))
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            if shape is None:
                raise ExplainError(f"'{path}' is an image, but this {family} model takes vectors.")
            try:
                image = decode_image(path.read_bytes(), shape[0], shape[1], index)
            except ValueError:
                raise ExplainError(f"'{path}' could not be decoded as an image.") from None
            rows.append(image[None])
        else:
            raise ExplainError(f"--inputs '{path}' must be a .npy array or an image file.")
    shapes = {row.shape[1:] for row in rows}
    if len(shapes) > 1:
        raise ExplainError(f"--inputs hold rows of different shapes {sorted(shapes)}.")
    return torch.from_numpy(np.concatenate(rows).astype(np.float32))


def _fit_array(array: np.ndarray, shape: tuple[int, int] | None, model, path: Path) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.number) or array.size == 0:
        raise ExplainError(
            f"'{path}' must hold numbers; got a {array.dtype} array of {array.shape}."
        )
    if shape is None:  # a vector model: (N, F) or one (F,) vector
        features = model.cfg.in_features
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != features:
            raise ExplainError(
                f"'{path}' holds an array of shape {array.shape}; this model takes (N, {features})."
            )
        return array
    channels = shape[0]
    if array.ndim == 3 and channels == 1:
        array = array[:, None]  # (N, H, W) grey images
    if array.ndim != 4 or array.shape[1] != channels:
        raise ExplainError(
            f"'{path}' holds an array of shape {array.shape}; this model takes images "
            f"(N, {channels}, H, W)" + (" or (N, H, W)." if channels == 1 else ".")
        )
    return array


def _label_names(model_dir: str) -> list[str] | None:
    config = Path(model_dir) / "config.json"
    try:
        names = json.loads(config.read_text()).get("labels") if config.is_file() else None
    except (ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _summary(result, out: Path) -> None:
    """A few lines on stdout: what was explained, the deltas, where the report is."""
    for step in getattr(result, "steps", []):
        deltas = ", ".join(
            f"{a.method} delta {a.delta:.2g}" for a in step.attributions if a.delta is not None
        )
        what = f"-> {step.target!r}: log p {step.logprob:.3f}"
        if step.contrast is not None:
            what += f", rather than {step.contrast!r}: {step.value:.3f}"
        print(what + (f" ({deltas})" if deltas else ""))
    for item in getattr(result, "items", []):
        name = item.label_name if item.label_name is not None else item.label
        what = "output" if item.label is None else f"class {name}: logit"
        prob = "" if item.probability is None else f", p {item.probability:.3f}"
        print(f"input {item.index}: {what} {item.value:.4g}{prob}")
    print(f"report: {out / 'report.html'}")


__all__ = ["ExplainConfig", "explain_command", "load_inputs", "input_units", "text_units"]
