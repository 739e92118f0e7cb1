"""The LLaVA recipe: every knob of ``moslora train --task llava``, the paper's setting by default,
and the two adapter groups it trains (language model and vision tower)."""

from __future__ import annotations

from dataclasses import dataclass

from moslora.config import ALL_LINEAR, MoSLoRAConfig
from moslora.train.recipe import RecipeBase

LANGUAGE_MODEL = "model.language_model"
VISION_TOWER = "model.vision_tower"
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATE_NAMES = ("llava-v1", "chat")  # LLaVA-1.5's USER/ASSISTANT, or the processor's own chat template


@dataclass
class LlavaRecipe(RecipeBase):
    """Every knob of ``moslora train --task llava``; the defaults are the paper's LLaVA setting.

    ``r``/``alpha``/``dropout``/``target_modules`` set the language model's adapter, ``vision_*``
    the vision tower's (``vision_r=0`` leaves the tower frozen and unadapted). Targets are matched
    inside each submodule; ``"all-linear"`` takes every linear layer of it. ``batch_size`` is the
    effective batch over all processes, ``warmup_ratio`` the share of steps with linear warmup.
    ``template`` is ``"llava-v1"`` (LLaVA-1.5's ``USER: … ASSISTANT: …``) or ``"chat"`` (the
    processor's own chat template, for LLaVA models trained with another one, e.g. Llama-3's).
    ``merged_output``, when set, is where the merged plain model goes after training
    (:func:`export_merged_llava`). The projector stays frozen.
    """

    model: str | None = None
    data: str | None = None
    image_folder: str | None = None
    output: str | None = None
    method: str = "moslora"
    mixer: str = "kaiming"
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: list[str] | str = ALL_LINEAR
    vision_r: int = 64
    vision_alpha: float = 16.0
    vision_dropout: float = 0.05
    vision_target_modules: list[str] | str = ALL_LINEAR
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 128
    micro_batch_size: int = 16
    cutoff_len: int = 2048
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    template: str = "llava-v1"
    system_prompt: str = LLAVA_SYSTEM
    save_steps: int = 500
    logging_steps: int = 10
    save_total_limit: int | None = 2
    seed: int = 42
    data_seed: int = 42
    precision: str = "auto"
    quantize: str | None = None
    gradient_checkpointing: bool = False
    skip_bad_rows: bool = False
    merged_output: str | None = None

    def check_more(self) -> None:
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"recipe: template must be one of {TEMPLATE_NAMES}, got {self.template!r}")

    def adapter_groups(self) -> dict[str, MoSLoRAConfig]:
        """The two adapter settings, keyed by the submodule each applies to."""
        mixer = self.mixer_or_none
        groups = {LANGUAGE_MODEL: MoSLoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules, mixer=mixer)}
        if self.vision_r:
            groups[VISION_TOWER] = MoSLoRAConfig(
                r=self.vision_r, alpha=self.vision_alpha, dropout=self.vision_dropout, target_modules=self.vision_target_modules, mixer=mixer
            )
        return groups
