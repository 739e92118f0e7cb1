"""The one configuration object of moslora: a JSON-serializable dataclass, validated when made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MIXERS = ("kaiming", "orthogonal", "identity", "two-subspace")
A_INITS = ("kaiming", "gaussian")
ADAPTER_DTYPES = ("float32", "base")
ALL_LINEAR = "all-linear"
# PEFT's TaskType values: the task_type an exported adapter records picks PEFT's model class.
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")
# LoraConfig fields with the same meaning here, under moslora's name.
_FROM_PEFT = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
              "exclude_modules": "exclude_modules", "use_rslora": "use_rslora", "modules_to_save": "modules_to_save"}
# LoraConfig fields that describe where the adapter came from or how PEFT runs it, not the adapter:
# fan_in_fan_out is found per layer (GPT-2's Conv1D), task_type from the model's class when saving.
_PEFT_BOOKKEEPING = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode", "fan_in_fan_out", "runtime_config", "megatron_core", "qalora_group_size"}


@dataclass
class MoSLoRAConfig:
    """How to add MoSLoRA adapters to a model.

    Each targeted layer with frozen weight W0 gets ``y = W0·x + s·B(M(A(dropout(x))))`` with
    A: r×in, M: r×r (the mixer), B: out×r and ``s = alpha / r`` (``alpha / √r`` with rsLoRA).

    Args:
        r: rank of the adapter.
        alpha: scaling numerator; the paper uses ``alpha = 2·r``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: which layers get adapters. A list matches a module whose full name equals
            an entry or ends with ``"." + entry``; a string is a regular expression that must match
            the full module name; ``"all-linear"`` takes every linear layer except the output head.
        exclude_modules: same forms as ``target_modules``; matching modules are left alone.
        mixer: ``"kaiming"`` (the paper's MoSLoRA), ``"orthogonal"``, ``"identity"``,
            ``"two-subspace"`` (the fixed mixer ``[[I, I], [I, I]]`` that turns rank-r LoRA into the
            paper's two-subspace mixing), or ``None`` for plain LoRA with no mixer at all.
        train_mixer: whether M learns; ``False`` with ``"kaiming"`` is the "init-only" baseline.
        init_A: ``"kaiming"`` (kaiming-uniform, a=√5, as LoRA and the authors' code) or
            ``"gaussian"`` (normal with std 1/r, as PEFT's gaussian init).
        use_rslora: scale by ``alpha / √r`` instead of ``alpha / r``.
        adapter_dtype: ``"float32"`` keeps adapters in fp32 whatever the base dtype; ``"base"``
            uses the base weight's dtype when it is a floating type.
        modules_to_save: modules (same matching as a target list) that train fully and are
            saved with the adapter, e.g. a new classification head. ``None`` (the default) means
            a transformers classification model's task head (``score`` or ``classifier``), which
            ``from_pretrained`` newly initialises, as PEFT's ``SEQ_CLS`` and ``TOKEN_CLS`` do, and
            nothing for other models; ``[]`` means none, the head included.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    mixer: str | None = "kaiming"
    train_mixer: bool = True
    init_A: str = "kaiming"
    use_rslora: bool = False
    adapter_dtype: str = "float32"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        _check_type("r", self.r, int)
        if self.r <= 0:
            raise ValueError(f"MoSLoRAConfig.r must be a positive integer, got {self.r}")
        _check_type("alpha", self.alpha, (int, float))
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"MoSLoRAConfig.alpha must be a positive finite number, got {self.alpha}")
        self.alpha = float(self.alpha)
        _check_type("dropout", self.dropout, (int, float))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoSLoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        self.dropout = float(self.dropout)
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        if self.target_modules == []:
            raise ValueError("MoSLoRAConfig.target_modules is empty: name at least one module")
        if self.exclude_modules is not None:
            self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        if self.mixer is not None and self.mixer not in MIXERS:
            raise ValueError(f"MoSLoRAConfig.mixer must be one of {MIXERS} or None, got {self.mixer!r}")
        if self.mixer == "two-subspace" and self.r % 2:
            raise ValueError(f"mixer='two-subspace' splits the rank in two halves and needs an even r, got r={self.r}")
        _check_type("train_mixer", self.train_mixer, bool)
        if self.init_A not in A_INITS:
            raise ValueError(f"MoSLoRAConfig.init_A must be one of {A_INITS}, got {self.init_A!r}")
        _check_type("use_rslora", self.use_rslora, bool)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"MoSLoRAConfig.adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise TypeError("MoSLoRAConfig.modules_to_save must be a list of module names, got a string")
            self.modules_to_save = _check_patterns("modules_to_save", self.modules_to_save)

    @property
    def scaling(self) -> float:
        """The factor s in front of B·M·A."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_peft(cls, peft_config: Any, *, mixer: str | None = "kaiming", **changes: Any) -> "MoSLoRAConfig":
        """The same adapter as PEFT's ``LoraConfig`` (or its dict, e.g. a PEFT ``adapter_config.json``),
        with a ``mixer`` (the paper's ``"kaiming"`` by default; ``None`` is plain LoRA).

        ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``exclude_modules``,
        ``use_rslora`` and ``modules_to_save`` carry over; ``init_lora_weights`` may be ``True``
        (kaiming A, as PEFT) or ``"gaussian"``. A LoRA variant moslora does not implement (DoRA,
        rank or alpha patterns, ``layers_to_transform``, a trained bias, PiSSA-style inits, …) is an
        error naming the field, never silently dropped. ``changes`` override fields afterwards,
        e.g. ``from_peft(lora_config, r=8)``.
        """
        if isinstance(peft_config, dict):
            data = dict(peft_config)
        elif dataclasses.is_dataclass(peft_config):
            data = {f.name: getattr(peft_config, f.name) for f in dataclasses.fields(peft_config)}
        else:
            raise TypeError(f"from_peft takes a peft.LoraConfig or a dict of its fields, got {type(peft_config).__name__}")
        if str(data.get("peft_type", "LORA")).rpartition(".")[2] != "LORA":
            raise ValueError(f"from_peft reads LoRA configs; this one has peft_type={data['peft_type']!r}")
        task_type = data.get("task_type")
        if task_type is not None and str(task_type).rpartition(".")[2] not in PEFT_TASK_TYPES:
            raise ValueError(f"task_type {task_type!r} is not one of PEFT's {PEFT_TASK_TYPES}")
        fields = {ours: data[theirs] for theirs, ours in _FROM_PEFT.items() if data.get(theirs) is not None}
        for name, value in fields.items():  # PEFT keeps module lists as sets (in any order in its JSON)
            if isinstance(value, (set, frozenset, list, tuple)):
                fields[name] = sorted(value)
        if "target_modules" not in fields and "target_modules" not in changes:
            raise ValueError("the LoraConfig has target_modules=None (PEFT then picks them by model type): name the "
                             "layers, e.g. from_peft(config, target_modules=['q_proj', 'v_proj']), or 'all-linear'")
        init = data.get("init_lora_weights", True)
        if init not in (True, "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} is not available in moslora (True or 'gaussian' are)")
        fields["init_A"] = "gaussian" if init == "gaussian" else "kaiming"
        if data.get("bias", "none") != "none":
            raise ValueError(f"bias={data['bias']!r}: moslora trains no biases; put the layers in modules_to_save instead")
        handled = set(_FROM_PEFT) | _PEFT_BOOKKEEPING | {"init_lora_weights", "bias"}
        # Everything else in LoraConfig switches on a variant when set (use_dora, rank_pattern, ...).
        variants = sorted(k for k, v in data.items() if k not in handled and v not in (None, False, {}, [], ()))
        if variants:
            raise ValueError(f"the LoraConfig sets {', '.join(f'{k}={data[k]!r}' for k in variants)}, which moslora does "
                             f"not implement; unset {'it' if len(variants) == 1 else 'them'}, or use PEFT for that variant")
        return cls(**{**fields, "mixer": mixer, **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoSLoRAConfig":
        """Build from a dict, refusing unknown keys by name (a typo must not be silently ignored)."""
        if not isinstance(data, dict):
            raise TypeError(f"a MoSLoRA config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoSLoRAConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "MoSLoRAConfig":
        return dataclasses.replace(self, **changes)


def _check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    # bool is an int subclass; a rank or alpha of True is a mistake, not 1.
    if isinstance(value, bool) and types is not bool:
        raise TypeError(f"MoSLoRAConfig.{name} must be a number, got a bool ({value})")
    if not isinstance(value, types):
        raise TypeError(f"MoSLoRAConfig.{name} has the wrong type: got {type(value).__name__} ({value!r})")


def _check_patterns(name: str, value: Any) -> list[str] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise TypeError(f"MoSLoRAConfig.{name} must be a string or a list of non-empty strings, got {value!r}")

