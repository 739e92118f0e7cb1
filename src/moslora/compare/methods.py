"""The methods ``moslora compare`` compares, each a change to the same :class:`MoSLoRAConfig`:
``lora`` is the mixer-less case of the same code, so two runs of a seed differ only in M."""

from __future__ import annotations

from typing import Any

from moslora.config import MoSLoRAConfig

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"mixer": None},
    "moslora": {"mixer": "kaiming"},
    "moslora-frozen": {"mixer": "kaiming", "train_mixer": False},
    "moslora-orthogonal": {"mixer": "orthogonal"},
}
BASELINE = "lora"


def method_config(task: Any, method: str, r: int) -> MoSLoRAConfig:
    """``method``'s adapter config for ``task`` at rank r (alpha = task.alpha_over_r · r)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {list(METHODS)}")
    return MoSLoRAConfig(
        r=r,
        alpha=task.alpha_over_r * r,
        dropout=task.dropout,
        target_modules=task.target_modules,
        exclude_modules=task.exclude_modules,
        modules_to_save=list(task.modules_to_save),
        **METHODS[method],
    )
