"""Exports for serving and sharing: consolidated safetensors + config.json + tokenizer.

:func:`export_checkpoint` turns a training checkpoint (saved under any layout) into one
``model.safetensors``, optionally cast to another dtype; :func:`load_exported` rebuilds the
model from it with no pickle and no torch.distributed. This is the artefact to hand to
others: unlike a training checkpoint, it is safe to load from an untrusted source.
:func:`export_hf` writes a ``gpt`` model as a Hugging Face Llama or GPT-2 directory (by
its variant) and :func:`import_hf` reads local Llama, GPT-2 and BERT directories
(safetensors) into baobab; :func:`save_exported` writes any model as an export directory.
Weight-only int8/int4 copies (config.json has "quantization") load with
:func:`load_quantized`, not :func:`load_exported`.
"""

from baobab.export.artifact import load_exported, read_config, save_exported
from baobab.export.consolidate import export_checkpoint
from baobab.export.hf_export import export_hf
from baobab.export.hf_import import import_hf
from baobab.export.quant_report import quantization_report
from baobab.export.quantize import load_quantized, quantize_export, quantize_model, save_quantized

__all__ = [
    "export_checkpoint",
    "export_hf",
    "import_hf",
    "load_exported",
    "load_quantized",
    "quantization_report",
    "quantize_export",
    "quantize_model",
    "read_config",
    "save_exported",
    "save_quantized",
]
