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
            saved with the adapter, e.g. a new classification head.
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

