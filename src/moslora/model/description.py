"""What an adapter is, independent of any file: :class:`AdapterDescription`.

A description says which layers carry adapters (their kind and the shapes of A, M and B), the
config they were made with, which modules train fully (``modules_to_save``) and where the base
came from. Every file format (native, PEFT, diffusers, groups) is read into, and written from, a
description plus a dict of tensors keyed ``<module>.lora_A|lora_M|lora_B`` (and
``<module>.<param>`` for ``modules_to_save``). A description is built from a model by
:func:`describe_adapter`, from a file by the readers in :mod:`moslora.io`, and checked when made,
so no reader can hand the model floor a malformed one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from moslora.config import MoSLoRAConfig
from moslora.core.layers import MoSLoRALayer
from moslora.model.inject import adapter_layers, get_config, peft_task_type, saved_module_names
from moslora.model.sharded import clean_name, layer_shapes

# Refuse configs whose rank could only be a mistake or an attack, before anything is allocated.
MAX_RANK = 65536
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class AdapterFormatError(ValueError):
    """An adapter directory or file is malformed, inconsistent, or does not fit the model."""


def check_module_name(field_name: str, name: Any) -> None:
    """A module name must be a dotted path of identifiers: never a path like ``../x``."""
    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise AdapterFormatError(f"field {field_name!r} has an invalid module name {name!r} (expected a dotted module path)")


@dataclass(frozen=True)
class LayerDescription:
    """One adapted layer: its kind (``MoSLoRALayer.kind``), in/out features and adapter shapes."""

    kind: str
    in_features: int
    out_features: int
    shapes: dict[str, tuple[int, ...]]  # "lora_A", "lora_M" (when there is a mixer), "lora_B"

    @classmethod
    def of(cls, layer: MoSLoRALayer) -> "LayerDescription":
        """The layer as built (its parameters may be sharded by an engine now)."""
        return cls(layer.kind, layer.in_features, layer.out_features, layer_shapes(layer))


@dataclass(frozen=True)
class AdapterDescription:
    """A model's adapter, described: config, adapted layers, fully trained modules, provenance.

    ``task_type`` is PEFT's (``"CAUSAL_LM"``, …) when known; it lets PEFT's ``AutoPeftModelFor…``
    pick the model class of an export.
    """

    config: MoSLoRAConfig
    modules: dict[str, LayerDescription]
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, MoSLoRAConfig):
            raise TypeError(f"config must be a MoSLoRAConfig, got {type(self.config).__name__}")
        if self.config.r > MAX_RANK:
            raise AdapterFormatError(f"field 'config.r': r={self.config.r} is larger than any real adapter (at most {MAX_RANK})")
        if not self.modules:
            raise AdapterFormatError("field 'modules' is empty")
        wanted = ["lora_A", "lora_M", "lora_B"] if self.has_mixer else ["lora_A", "lora_B"]
        for name, layer in self.modules.items():
            check_module_name("modules", name)
            if sorted(layer.shapes) != sorted(wanted):
                raise AdapterFormatError(f"field 'modules.{name}.shapes' has {sorted(layer.shapes)}; a config with mixer={self.config.mixer!r} needs {wanted}")
            if layer.shapes["lora_A"][:1] != (self.config.r,) or layer.shapes["lora_B"][1:2] != (self.config.r,):
                raise AdapterFormatError(f"field 'modules.{name}.shapes' does not have rank r={self.config.r}: {dict(layer.shapes)}")
        for name in self.modules_to_save:
            check_module_name("modules_to_save", name)
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

    @property
    def has_mixer(self) -> bool:
        return self.config.mixer is not None

    def expected_keys(self) -> list[str]:
        """The tensor keys of the adapter's layers (not of ``modules_to_save``), in order."""
        return [f"{name}.{attr}" for name, layer in self.modules.items() for attr in layer.shapes]

    def replace(self, **changes: Any) -> "AdapterDescription":
        return dataclasses.replace(self, **changes)


def describe_adapter(model: nn.Module, *, base_model_name_or_path: str | None = None) -> AdapterDescription:
    """The description of an injected model's adapter (as a whole: for adapter groups, describe
    each group's submodule), under the model's own module names (without the path segments that
    FSDP or activation checkpointing insert). The base model's name defaults to ``model.config.name_or_path``."""
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return AdapterDescription(
        config=get_config(model),
        modules={clean_name(name): LayerDescription.of(layer) for name, layer in adapter_layers(model)},
        modules_to_save=tuple(clean_name(name) for name in saved_module_names(model)),
        base_model_name_or_path=base_model_name_or_path,
        task_type=peft_task_type(model),
    )
