"""moslora: MoSLoRA (Mixture-of-Subspaces LoRA) for any PyTorch model.

Each adapted layer computes ``y = W0·x + s·B(M(A(dropout(x))))``: LoRA's down- and up-projections
A and B with a learnable r×r mixer M between them (Wu et al., EMNLP 2024, arXiv:2406.11909).
After training, M folds into A (A' = M·A), so a MoSLoRA adapter exports to an exactly equal plain
LoRA adapter and costs nothing extra at inference.
"""

__version__ = "0.1.0"

from moslora.config import MoSLoRAConfig
from moslora.core.layers import (
    MoSLoRAConv,
    MoSLoRAConv1D,
    MoSLoRAEmbedding,
    MoSLoRALayer,
    MoSLoRALinear,
)
from moslora.io.export import export_lora
from moslora.io.groups import load_adapter_groups, save_adapter_groups
from moslora.io.native import AdapterFormatError, load_adapter, read_adapter, save_adapter
from moslora.io.peft_format import import_lora
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

__all__ = [
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
]
