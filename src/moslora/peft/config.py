"""``moslora.peft.LoraConfig``: PEFT's ``LoraConfig`` with one more field, ``mixer``.

In memory it is a LoRA config (``peft_type`` LORA), so ``get_peft_model``, TRL's ``peft_config=`` and
every PEFT method treat it as LoRA. Saved, an adapter with a mixer records ``peft_type``
:data:`~moslora.io.peft_format.PEFT_ROUTE_TYPE` instead, which stock PEFT refuses with that value
(which says what to do) in its error, where a LORA config would load A and B and drop M silently;
:meth:`LoraConfig.from_pretrained` reads it back. An adapter without a mixer is saved as PEFT's own
plain LoRA folder, which stock PEFT loads exactly.

Importing this module files :class:`LoraConfig` in PEFT's table of configs by saved ``peft_type``
(``PEFT_TYPE_TO_CONFIG_MAPPING``, where PEFT's ``register_peft_method`` files its own methods) under
:data:`PEFT_ROUTE_TYPE`, a key PEFT does not use. Every loader that reads a config through PEFT's
``PeftConfig`` then reads a MoSLoRA folder as this class: PEFT's ``AutoPeftModel*``, ``PeftModel.load_adapter``
and ``hotswap_adapter``, transformers' ``load_adapter``, ``AutoModel*.from_pretrained(adapter_dir)`` and
``pipeline``. A process that never imports moslora.peft has no such entry, and PEFT refuses the folder.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from moslora.config import MIXERS
from moslora.io.peft_format import PEFT_ROUTE_TYPE
from moslora.peft.dispatch import mixer_layer

# init_lora_weights values that set A and B alone; the others (PiSSA, OLoRA, LoftQ, EVA, …) derive them
# from the base weight assuming ΔW = s·B·A, which a mixer between them would break.
_MIXER_INITS = (True, False, "gaussian")


class _Lineage:
    """Which config object first made an adapter, and the layers that adapter went on. Shallow copies of
    a config (``dataclasses.replace``, ``copy.copy``) share it, deep copies get a new one: that is how a
    copy of another adapter's config, as PEFT's ``add_weighted_adapter`` makes, is told from a config of
    its own (:meth:`LoraConfig.__post_init__`, :func:`moslora.peft.layers.check_adapter_config`)."""

    def __init__(self) -> None:
        self.owner: weakref.ref | None = None
        self.layers: weakref.WeakSet = weakref.WeakSet()

    def __deepcopy__(self, memo: dict) -> "_Lineage":
        return _Lineage()

    def __reduce__(self) -> tuple:
        return _Lineage, ()  # a pickled config, like a deep copy, starts its own lineage

    def copied(self, config: "LoraConfig") -> bool:
        owner = self.owner() if self.owner is not None else None
        return owner is not None and owner is not config

    def mixer_layer(self) -> str | None:
        """The name of a layer holding a mixer among the layers reachable from this lineage's (a layer
        leads to the lineages of every adapter on it): in practice, the model the adapter is in."""
        seen, todo = {id(self)}, [self]
        while todo:
            for layer in list(todo.pop().layers):
                if len(layer.lora_M):
                    return layer.moslora_target_name
                for ref in layer.moslora_lineages.values():
                    other = ref()
                    if other is not None and id(other) not in seen:
                        seen.add(id(other))
                        todo.append(other)
        return None


@dataclass
class LoraConfig(peft.LoraConfig):
    """PEFT's ``LoraConfig`` and MoSLoRA's ``mixer``: each adapted layer computes
    ``W0·x + s·B(M(A(dropout(x))))`` with a learnable r×r mixer M (Wu et al., EMNLP 2024, arXiv:2406.11909).

    Args:
        mixer: how M starts: ``"kaiming"`` (the paper's), ``"orthogonal"``, ``"identity"`` (plain LoRA at
            the start), ``"two-subspace"``; or ``None`` for plain LoRA, which is exactly PEFT's own.
        Every other argument is PEFT's. With a mixer, the targets must be ``nn.Linear``, bitsandbytes 4/8-bit
        or transformers' ``Conv1D`` layers (anything else is an error naming it), and PEFT's other LoRA
        variants (DoRA, …), trained LoRA biases, ``target_parameters`` and inits that read the base weight
        are refused by name.
    """

    mixer: Optional[str] = field(
        default="kaiming",
        metadata={"is_lora_variant": True,
                  "help": "MoSLoRA's r×r mixer between A and B and how it starts: 'kaiming' (the paper's), 'orthogonal', "
                          "'identity', 'two-subspace'; None for plain LoRA"},
    )  # fmt: skip
    _lineage: _Lineage = field(default_factory=_Lineage, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._refuse_a_copy_on_a_model_with_mixers()
        if self.mixer is not None:
            if self.mixer not in MIXERS:
                raise ValueError(f"LoraConfig.mixer must be one of {MIXERS} or None, got {self.mixer!r}")
            self._check_mixer_combines()
        # Every target goes through mixer_layer first; it hands PEFT back what it leaves to PEFT.
        self._register_custom_module({nn.Module: mixer_layer})

    def _refuse_a_copy_on_a_model_with_mixers(self) -> None:
        # PEFT's add_weighted_adapter makes its new adapter's config with dataclasses.replace of the first
        # source's config, stores it in peft_config and then combines the sources' A and B without their
        # mixers. Refused here, before PEFT stores it, the model is left exactly as it was.
        if not self._lineage.copied(self):
            return
        layer = self._lineage.mixer_layer()
        if layer is not None:
            raise ValueError(
                f"moslora.peft: this LoraConfig is a copy (dataclasses.replace) of the config of an adapter in a model "
                f"with MoSLoRA mixers (layer {layer!r}). PEFT's add_weighted_adapter makes its adapter that way and then "
                "combines the adapters' A and B without their mixers, which is not the combination you asked for: use "
                "moslora.peft.add_weighted_adapter(model, ...), which is exact (the model is unchanged). For a new "
                "adapter, make a new moslora.peft.LoraConfig, or copy.deepcopy this one"
            )

    def _check_mixer_combines(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "mixer" and f.metadata.get("is_lora_variant") and getattr(self, f.name):
                raise ValueError(f"LoraConfig sets {f.name}={getattr(self, f.name)!r}, another LoRA variant, with mixer={self.mixer!r}; "
                                 "the mixer combines with none of them: unset one")
        if self.init_lora_weights not in _MIXER_INITS:
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} derives A and B from the base weight as if ΔW = s·B·A; "
                             f"with mixer={self.mixer!r} use True (kaiming A, as PEFT's default) or 'gaussian'")
        if self.lora_bias:
            raise ValueError(f"lora_bias=True trains a bias in B; with mixer={self.mixer!r} put the layer in modules_to_save instead")
        if self.target_parameters:
            raise ValueError(f"target_parameters={self.target_parameters!r}: a mixer goes on layers (target_modules), not on parameters")

    def to_dict(self) -> dict[str, Any]:
        """The config as saved: with a mixer, ``peft_type`` is :data:`PEFT_ROUTE_TYPE` (stock PEFT refuses
        it); without one, the ``mixer`` key is left out, so the folder is PEFT's own plain LoRA."""
        data = super().to_dict()
        data.pop("_lineage")
        if self.mixer is None:
            data.pop("mixer")
        else:
            data["peft_type"] = PEFT_ROUTE_TYPE
        return data

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """A saved config as this class's arguments (PEFT's hook for subclasses, called by ``from_pretrained``):
        a MoSLoRA config or a plain LoRA one, which becomes ``mixer=None``."""
        kwargs = super().check_kwargs(**kwargs)
        peft_type = kwargs.pop("peft_type", None)
        if peft_type == PEFT_ROUTE_TYPE:
            if kwargs.get("mixer") is None:
                raise ValueError(f"adapter_config.json has peft_type {PEFT_ROUTE_TYPE!r} but no mixer")
        elif str(peft_type).rpartition(".")[2] == "LORA":
            kwargs.setdefault("mixer", None)
        else:
            raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; moslora.peft loads LoRA and MoSLoRA adapters")
        return kwargs


# Registration: a new key only (register_peft_method itself accepts only names of PEFT's PeftType enum).
PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(PEFT_ROUTE_TYPE, LoraConfig)
