"""Model families (one file each), a flat registry of named sizes, parameter and FLOP counts.

Models run on one device; parallelism is applied from outside (no torch.distributed here).
"""

from baobab.models import sizes as _sizes  # noqa: F401  (registers the built-in models)
from baobab.models.bert import Bert, BertConfig
from baobab.models.gpt import GPT, GPTConfig
from baobab.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from baobab.models.lstm import LSTMLM, LSTMConfig
from baobab.models.mlp import MLP, MLPConfig
from baobab.models.registry import (
    TASKS,
    ModelFamily,
    build_model,
    count_params,
    family_names,
    family_of,
    forward_flops,
    get_config,
    model_names,
    register_family,
    register_size,
    task_of,
    training_flops_per_token,
)
from baobab.models.resnet import ResNet, ResNetConfig

__all__ = [
    "GPT",
    "LSTMLM",
    "MLP",
    "TASKS",
    "Bert",
    "BertConfig",
    "GPTConfig",
    "LoRAConfig",
    "LoRALinear",
    "LSTMConfig",
    "MLPConfig",
    "ModelFamily",
    "ResNet",
    "ResNetConfig",
    "apply_lora",
    "build_model",
    "count_params",
    "family_names",
    "family_of",
    "forward_flops",
    "get_config",
    "load_lora_state_dict",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "model_names",
    "register_family",
    "register_size",
    "task_of",
    "training_flops_per_token",
]
