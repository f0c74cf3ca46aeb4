"""What each ``baobab`` subcommand does, as plain typed Python functions.

The CLI (``baobab.cli``) derives flags and help from these signatures and docstrings; the
same functions are the Python API for scripts and notebooks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from baobab import data as bdata
from baobab import models
from baobab.checkpoint import load_trained_model, resolve_checkpoint
from baobab.diskspace import writing
from baobab.models.sampling import generate as sample_tokens
from baobab.recipes import recipe_names, recipe_path
from baobab.train.config import RunConfig
from baobab.train.metrics import format_values
from baobab.train.run import run
from baobab.train.trainer import TrainResult


def prepare(cfg: bdata.PrepareConfig) -> bdata.Manifest:
    """Tokenize text files (.txt/.jsonl/.parquet or directories) into token shards."""
    manifest = bdata.prepare(cfg)
    for split in ("train", "val"):
        print(
            f"{split}: {manifest.split_tokens(split):,} tokens in {len(manifest.shard_paths(split))} shard(s)"
        )
    print(f"wrote {cfg.out}")
    return manifest


def train(cfg: RunConfig) -> TrainResult:
    """Train a model from a recipe and dotted overrides."""
    run_dir = cfg.train.run_dir
    # The checkpoint saves say which one failed; this catches the rest (config, metrics).
    with writing(f"the files of run directory '{run_dir}'", run_dir):
        result = run(cfg)
    print(f"done: step {result.step}, loss {result.loss:.4f}  {format_values(result.val)}")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return result


def finetune(cfg: RunConfig) -> TrainResult:
    """Fine-tune the model in ``model.init`` (fully, or only LoRA adapters with ``lora``)."""
    if not cfg.model.init:
        raise ValueError(
            "baobab finetune needs --model.init: an export, checkpoint, run or Hugging Face "
            "model directory to start from"
        )
    return train(cfg)


def evaluate(checkpoint: str, batches: int = 0) -> dict[str, float]:
    """Evaluate a checkpoint on its run's validation data.

    Args:
        checkpoint: a checkpoint directory, or a run directory (its newest checkpoint).
        batches: a sample of this many batches spread over the split, drawn as
            train.eval_batches draws it, so it reproduces a one-process run's periodic
            val_loss (0: the whole split).
    """
    from baobab.train.device import pick_device
    from baobab.train.evaluate import evaluate as run_eval
    from baobab.train.objectives import build_objective
    from baobab.train.run import build_data

    ckpt = resolve_checkpoint(checkpoint)
    model, meta = load_trained_model(ckpt)
    cfg = RunConfig.from_dict(meta["run"])
    bundle = build_data(cfg)
    if bundle.val is None:
        raise ValueError(f"the run of '{ckpt}' has no validation data to evaluate on")
    objective = build_objective(
        meta["objective"],
        mask_id=bundle.mask_id,
        vocab_size=bundle.facts.get("tokenizer_vocab_size"),
        mask_prob=cfg.train.mask_prob,
    )
    device = pick_device(cfg.train.device)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    result = run_eval(
        model.to(device), bundle.val, objective, device, cfg.train.precision, batches, generator,
        seed=cfg.train.seed,
    )  # fmt: skip
    print(f"{ckpt}: {format_values(result)}")
    return result


def generate(
    checkpoint: str,
    prompt: str = "",
    max_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Sample a continuation of a prompt from a language model.

    Args:
        checkpoint: a checkpoint or run directory (its newest checkpoint), a baobab export,
            a Hugging Face directory, or a registry model ``models:/NAME@ALIAS`` or
            ``models:/NAME/VERSION`` (pulled from $BAOBAB_REGISTRY and verified first).
        prompt: the text to continue.
        max_tokens: at most this many new tokens.
        temperature: 0 is greedy; higher is more random.
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches p.
        seed: the same seed and prompt give the same text.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")
    from baobab.export.open import open_model
    from baobab.registry import resolve_model_dir

    opened = open_model(resolve_model_dir(checkpoint))
    model = opened.model
    if models.task_of(model.cfg) != "causal_lm":
        raise ValueError(
            f"'{checkpoint}' holds a {opened.described['family']} model, which does not generate text"
        )
    if opened.tokenizer_file is None:
        raise ValueError(f"'{checkpoint}' has no tokenizer.json to encode the prompt with")
    tokenizer = bdata.Tokenizer.load(opened.tokenizer_file)
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    new = sample_tokens(
        model,
        ids,
        max_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        (tokenizer.eot_id,),
        getattr(model.cfg, "max_seq_len", None),
    )
    text = prompt + tokenizer.decode(new)
    print(text)
    return text


def export(
    checkpoint: str,
    out: str,
    dtype: str | None = None,
    overwrite: bool = False,
    format: str = "safetensors",
    gguf_type: str = "f16",
) -> Path:
    """Write a checkpoint (saved under any layout) as consolidated safetensors + config + tokenizer,
    or a Llama-style gpt as a GGUF file for llama.cpp (and an Ollama Modelfile).

    Args:
        checkpoint: a checkpoint directory, or a run directory (its newest checkpoint); for
            gguf and ollama also a baobab export or a Hugging Face Llama directory.
        out: the directory to write; loadable on one device with no torch.distributed.
        dtype: cast the weights: float32, bfloat16 or float16 (default: as trained);
            safetensors only (GGUF has --gguf-type).
        overwrite: replace an existing export in ``out`` (a run, checkpoint, corpus or any
            other directory is never replaced).
        format: safetensors (a baobab export), gguf (``out/model.gguf``) or ollama
            (``out/model.gguf`` and ``out/Modelfile``).
        gguf_type: the GGUF weights: f32, f16 or q8_0 (norms stay f32).
    """
    from baobab.export import export_checkpoint
    from baobab.export.atomic import refuse_to_overwrite

    formats = ("safetensors", "gguf", "ollama")
    if format not in formats:
        raise ValueError(f"--format must be one of {', '.join(formats)}; got {format!r}")
    if format != "safetensors":
        from baobab.export.gguf import OLLAMA_DEFAULT_TEMPLATE, export_gguf
        from baobab.serve.chat import DEFAULT_TEMPLATE, ChatTemplate

        if dtype is not None:
            raise ValueError("--dtype applies to --format safetensors; GGUF takes --gguf-type")
        template = ChatTemplate.for_export(checkpoint).source  # the model's, else the default
        go = None
        if format == "ollama":
            if template != DEFAULT_TEMPLATE:
                raise ValueError(
                    "--format ollama writes the Go template of baobab's default chat template "
                    f"only, and '{checkpoint}' has its own chat_template.jinja; use --format gguf "
                    "and write the Modelfile's TEMPLATE by hand"
                )
            go = OLLAMA_DEFAULT_TEMPLATE
        path = export_gguf(checkpoint, out, gguf_type, template, go, overwrite)
        print(f"wrote {path} ({gguf_type} GGUF{' and an Ollama Modelfile' * (format == 'ollama')})")
        return path
    refuse_to_overwrite(Path(out), overwrite, (checkpoint,))
    path = export_checkpoint(checkpoint, out, dtype=dtype, overwrite=overwrite)
    print(f"wrote {path}")
    return path


def quantize(
    export_dir: str,
    out: str,
    /,
    bits: int = 8,
    group_size: int = 64,
    symmetric: bool = False,
    head: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a weight-only int8/int4 copy of an export directory (load it with load_quantized).

    Args:
        export_dir: a directory written by ``baobab export``.
        out: the directory to write.
        bits: 8 (per-channel int8) or 4 (group-wise int4, two values per byte).
        group_size: int4 group along the input dim: 32, 64 or 128.
        symmetric: int4 without zero points.
        head: quantize the output head too (as llama.cpp's q8_0 does); a head tied to the
            token embedding then gets its own quantized copy, the embedding stays as it is.
            Off, the head keeps the export's precision (at the gpt2-124m shape it is then
            over a third of an int8 decode step).
        overwrite: replace an existing export at ``out``.
    """
    from baobab.export import quantize_export
    from baobab.export.atomic import refuse_to_overwrite
    from baobab.export.quantize import DEFAULT_SKIP

    refuse_to_overwrite(Path(out), overwrite, (export_dir,))
    skip = () if head else DEFAULT_SKIP
    path = quantize_export(
        export_dir, out, bits, group_size, skip=skip, symmetric=symmetric, overwrite=overwrite
    )
    print(f"wrote {path}")
    return path


def hf_export(
    source: str,
    /,
    out: str,
    dtype: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a gpt model as a Hugging Face Llama or GPT-2 directory, whichever its variant is.

    Args:
        source: a baobab export directory, a checkpoint, or a run directory (its newest
            checkpoint).
        out: the Hugging Face directory to write (transformers' from_pretrained loads it).
        dtype: cast the weights: float32, bfloat16 or float16 (default: as stored).
        tokenizer: a tokenizer.json to ship instead of the one stored with the model.
        overwrite: replace an existing export (or Hugging Face directory) at ``out``.
    """
    import json

    from baobab.export import export_hf

    path = export_hf(source, out, tokenizer_file=tokenizer, dtype=dtype, overwrite=overwrite)
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    print(f"wrote {path} ({arch})")
    return path


def hf_import(hf_dir: str, /, out: str, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write a local Hugging Face model directory as a baobab export directory.

    Args:
        hf_dir: a LlamaForCausalLM, GPT2LMHeadModel, BertForMaskedLM or BertModel directory
            with config.json and *.safetensors weights (pickled .bin weights are refused).
        out: the export directory to write (load_exported and serving read it).
        dtype: cast the weights: float32, bfloat16 or float16 (default: as stored).
        overwrite: replace an existing export at ``out``.
    """
    from baobab.export import import_hf, save_exported
    from baobab.export.artifact import parse_dtype
    from baobab.export.atomic import refuse_to_overwrite

    torch_dtype = parse_dtype(dtype)
    refuse_to_overwrite(Path(out), overwrite, (hf_dir,))  # before reading any weights
    model, meta = import_hf(hf_dir, torch_dtype)
    objective = models.task_of(model.cfg)
    path = save_exported(
        model, out, meta["model"], objective, tokenizer_file=meta["tokenizer"], overwrite=overwrite
    )
    print(f"wrote {path} ({meta['architecture']} as a baobab {meta['model']['family']} model)")
    if meta["missing"]:
        print(
            f"note: '{hf_dir}' has no {', '.join(meta['missing'])}; they keep their initial values"
        )
    return path


def list_models(seq_len: int = 2048) -> list[dict]:
    """List the registered model sizes with parameters and training FLOPs per token.

    Args:
        seq_len: sequence length for the FLOP count of sequence models.
    """
    rows = []
    for name in models.model_names():
        cfg = models.get_config(name)
        model = models.build_model(cfg, device="meta")
        length = min(seq_len, cfg.max_seq_len) if hasattr(cfg, "max_seq_len") else None
        flops = models.training_flops_per_token(cfg, length)
        rows.append(
            {
                "name": name,
                "family": models.family_of(cfg).name,
                "params": models.count_params(model),
                "flops": flops,
            }
        )
    print(f"{'model':<18} {'family':<8} {'params':>10} {'train FLOPs/token':>18}")
    for row in rows:
        print(
            f"{row['name']:<18} {row['family']:<8} {_human(row['params']):>10} {_human(row['flops']):>18}"
        )
    print("(FLOPs per sample for models that do not take tokens)")
    return rows


def list_recipes() -> list[str]:
    """List the shipped recipes (use one with ``baobab train --recipe NAME``)."""
    for name in recipe_names():
        first = recipe_path(name).read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<15} {first}")
    return recipe_names()


def quickstart(
    run_dir: str = "runs/quickstart",
    data_dir: str = "data/stdlib-4096",
    seed: int = 0,
    max_steps: int | None = None,
    prompt: str = "def ",
    progress: bool = True,
) -> TrainResult:
    """Prepare the standard-library corpus, train gpt-mini on CPU, print a sample.

    Args:
        run_dir: where checkpoints and metrics go (started afresh each time).
        data_dir: where the prepared corpus goes (reused when already there).
        seed: the same seed gives the same tokenizer, losses and sample.
        max_steps: optimizer updates to train for (default: the quickstart recipe's).
        prompt: the code to continue once trained.
        progress: show progress bars.
    """
    from baobab.train.flags import parse_run_config

    cfg = parse_run_config(["--recipe", "quickstart"])
    cfg.data.path = data_dir
    cfg.train = dataclasses.replace(
        cfg.train,
        run_dir=run_dir,
        seed=seed,
        max_steps=max_steps or cfg.train.max_steps,
        overwrite=True,
        progress=progress,
    )
    result = train(cfg)
    print("\nsample:")
    print("-" * 60)
    generate(
        str(result.checkpoint),
        prompt=prompt,
        max_tokens=120,
        temperature=0.8,
        top_p=0.95,
        seed=seed,
    )
    print("-" * 60)
    return result


def plot(run_dirs: list[str], out: str = "runs/plot.png") -> Path:
    """Plot loss, learning rate and throughput of one or several runs into a PNG.

    Args:
        run_dirs: run directories (each holds a metrics.jsonl).
        out: the PNG file to write.
    """
    from baobab.train.plot import plot_runs

    path = plot_runs(run_dirs, out)
    print(f"wrote {path}")
    return path


def plan(
    cfg: RunConfig,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    device_memory: str | None = None,
    device_peak_tflops: float | None = None,
    as_json: bool = False,
    search: bool = False,
    intra_node_gbps: float = 200.0,
    inter_node_gbps: float = 25.0,
) -> bool:
    """Say what a run needs per device before it starts (``baobab train``'s flags): memory
    per rank by part against the device's, FLOPs per step, step time and MFU ceiling;
    ``search`` ranks every layout of the world size that fits. Returns whether one fits."""
    from baobab.train.plan_report import hardware, report
    from baobab.train.run import _check_features

    for key, value in (("nproc-per-node", nproc_per_node), ("nnodes", nnodes)):
        if value < 1:
            raise ValueError(f"--{key} must be at least 1, got {value}")
    hw = hardware(
        cfg, nproc_per_node, device_memory, device_peak_tflops, intra_node_gbps, inter_node_gbps
    )
    text, fits = report(
        cfg,
        nproc_per_node * nnodes,
        hw,
        find=search,
        as_json=as_json,
        check=lambda layout: _check_features(cfg, layout),
    )
    print(text)
    return fits


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
