"""A training recipe: every knob of ``moslora train`` in one dataclass.

The defaults are the paper's commonsense-reasoning recipe (MoSLoRA, Wu et al. 2024, §4.1, following
LLM-Adapters): r=16, alpha=32, dropout 0.05 on q,k,v,up,down; AdamW at lr 3e-4 with 100 warmup
steps then linear decay; 3 epochs; batch 16 as micro-batches of 4; prompts cut at 256 tokens; 120
rows held out for validation. A YAML recipe overrides the defaults, and command-line flags
override the recipe.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moslora.config import MIXERS, MoSLoRAConfig
from moslora.io.yaml_mapping import read_yaml_mapping

METHODS = ("moslora", "lora")
QUANTIZE = (None, "4bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The paper's LLM targets (LLaMA names; SmolLM2, Mistral, Qwen use the same).
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class RecipeBase:
    """What every recipe dataclass (this one, LLaVA's, DreamBooth's) shares: its validation, the
    batch arithmetic and (de)serialization.

    Validation is written once, here: each field a subclass has is checked by its name against the
    tables below (numbers may come from YAML as strings like ``"3e-4"``); a subclass adds only
    :meth:`check_more` for fields of its own, and :meth:`adapter_groups` says which adapters it
    trains (their configs validate ranks, alphas, dropouts and targets where they are defined).
    """

    NUMBERS: ClassVar[tuple[str, ...]] = ("alpha", "dropout", "vision_alpha", "vision_dropout", "learning_rate",
                                          "weight_decay", "num_epochs", "max_grad_norm", "warmup_ratio")
    POSITIVE_INTS: ClassVar[tuple[str, ...]] = ("batch_size", "micro_batch_size", "cutoff_len", "resolution", "save_steps",
                                                "eval_steps", "logging_steps")
    NON_NEGATIVE_INTS: ClassVar[tuple[str, ...]] = ("val_set_size", "warmup_steps", "vision_r")
    CHOICES: ClassVar[dict[str, tuple]] = {"method": METHODS, "mixer": MIXERS, "quantize": QUANTIZE, "precision": PRECISIONS}

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for name in names & set(self.NUMBERS):
            setattr(self, name, number(name, getattr(self, name)))
        for name, allowed in self.CHOICES.items():
            if name in names and getattr(self, name) not in allowed:
                raise ValueError(f"recipe: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in names & set(self.POSITIVE_INTS + self.NON_NEGATIVE_INTS):
            value, least = getattr(self, name), 1 if name in self.POSITIVE_INTS else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"recipe: {name} must be a {'positive' if least else 'non-negative'} integer, got {value!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"recipe: batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ValueError(f"recipe: max_steps must be a positive integer, got {self.max_steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"recipe: learning_rate must be positive, got {self.learning_rate}")
        if "warmup_ratio" in names and not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"recipe: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.check_more()
        self.adapter_groups()

    def check_more(self) -> None:
        """Checks of the fields only this kind of recipe has (none by default)."""

    def adapter_groups(self) -> dict[str, MoSLoRAConfig]:
        """The adapters to train, keyed by the submodule each applies to (``""``: the whole model)."""
        return {"": self.adapter_config()}

    def adapter_config(self) -> MoSLoRAConfig:
        return MoSLoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules, mixer=self.mixer_or_none)

    @property
    def mixer_or_none(self) -> str | None:
        """The mixer kind; ``None`` for ``method="lora"`` (plain LoRA is MoSLoRA without M)."""
        return None if self.method == "lora" else self.mixer

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size × processes "
                f"({self.micro_batch_size} × {world_size})"
            )
        return self.batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass
class Recipe(RecipeBase):
    """How to fine-tune a causal LM with MoSLoRA (or plain LoRA).

    ``batch_size`` is the effective batch over all processes: gradient accumulation is
    ``batch_size / (micro_batch_size · world_size)`` and must come out a whole number.
    ``max_steps`` (when set) overrides ``num_epochs``. ``precision="auto"`` trains in bf16 where the
    GPU supports it and in fp32 otherwise.
    """

    model: str | None = None
    data: str | None = None
    output: str | None = None
    method: str = "moslora"
    mixer: str = "kaiming"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLM_TARGETS))
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    num_epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    micro_batch_size: int = 4
    cutoff_len: int = 256
    val_set_size: int = 120
    warmup_steps: int = 100
    lr_scheduler: str = "linear"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    train_on_inputs: bool = False
    add_eos_token: bool = True
    save_steps: int = 80
    eval_steps: int = 80
    logging_steps: int = 10
    save_total_limit: int | None = 3
    seed: int = 42
    data_seed: int = 42
    precision: str = "auto"
    quantize: str | None = None
    gradient_checkpointing: bool = False
    skip_bad_rows: bool = False


def number(name: str, value: Any) -> float:
    """A recipe field's value as a float. PyYAML reads "3e-4" (no dot) as a string; it is accepted
    as the number it plainly is, anything else not a number is an error naming the field."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"recipe: {name} must be a number, got {value!r}")
    return float(value)


def load_recipe(path: str | os.PathLike | None = None, *, cls: type = Recipe, **overrides: Any) -> Any:
    """Paper defaults, then the YAML file at ``path``, then ``overrides`` (``None`` values ignored).

    ``cls`` is the recipe dataclass (:class:`Recipe`; the LLaVA and DreamBooth tasks have their own).

    An unknown key in the file is an error naming it: a typo must not silently fall back to a default.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_mapping(path, {f.name for f in dataclasses.fields(cls)}, what="recipe", empty_ok=True))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"recipe{' ' + str(path) if path else ''}: {e}") from e


def resolve_recipe(recipe: Any, cls: type, required: tuple[str, ...], **fields: Any) -> Any:
    """The recipe a run uses: ``recipe`` (a ``cls`` instance, a YAML path, or ``None`` for the
    defaults) with ``fields`` applied over it (``None`` values ignored, paths as strings). Every
    field named in ``required`` must end up set; a missing one is an error saying how to give it."""
    given = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in fields.items() if v is not None}
    recipe = recipe.replace(**given) if isinstance(recipe, cls) else load_recipe(recipe, cls=cls, **given)
    for name in required:
        if getattr(recipe, name) is None:
            raise ValueError(f"no {name} given: pass --{name.replace('_', '-')} or set {name!r} in the recipe")
    return recipe
