"""moslora: MoSLoRA (Mixture-of-Subspaces LoRA) for any PyTorch model.

Each adapted layer computes ``y = W0·x + s·B(M(A(dropout(x))))``: LoRA's down- and up-projections
A and B with a learnable r×r mixer M between them (Wu et al., EMNLP 2024, arXiv:2406.11909).
After training, M folds into A (A' = M·A), so a MoSLoRA adapter exports to an exactly equal plain
LoRA adapter and costs nothing extra at inference.
"""

from moslora.cli import console as _console
from moslora.config import MoSLoRAConfig
from moslora.core.layers import (
    MoSLoRAConv,
    MoSLoRAConv1D,
    MoSLoRAEmbedding,
    MoSLoRALayer,
    MoSLoRALinear,
)
from moslora.io.export import export_lora
from moslora.io.groups import save_adapter_groups
from moslora.io.load import import_lora, load_adapter, load_adapter_groups
from moslora.io.native import read_adapter, save_adapter
from moslora.model.description import AdapterDescription, AdapterFormatError, describe_adapter
from moslora.model.groups import adapter_groups, inject_groups
from moslora.model.inject import adapter_layers, find_targets, get_config, inject, unload
from moslora.model.ops import (
    adapter_state_dict,
    disabled,
    merge,
    merge_and_unload,
    parameter_counts,
    print_trainable_parameters,
    unmerge,
)
from moslora.version import __version__

# What transformers and peft import (torchao, bitsandbytes, ...) logs lines no moslora user needs;
# drop exactly those, before the user's own script imports them (see moslora.cli.console).
_console.filter_noise()

__all__ = [
    "AdapterDescription",
    "AdapterFormatError",
    "MoSLoRAConfig",
    "MoSLoRAConv",
    "MoSLoRAConv1D",
    "MoSLoRAEmbedding",
    "MoSLoRALayer",
    "MoSLoRALinear",
    "adapter_groups",
    "adapter_layers",
    "adapter_state_dict",
    "describe_adapter",
    "disabled",
    "export_lora",
    "find_targets",
    "get_config",
    "import_lora",
    "inject",
    "inject_groups",
    "load_adapter",
    "load_adapter_groups",
    "merge",
    "merge_and_unload",
    "parameter_counts",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "save_adapter_groups",
    "unload",
    "unmerge",
    "__version__",
]
