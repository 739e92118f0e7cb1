"""Visual instruction tuning of LLaVA with MoSLoRA (the paper's §4.3), on the transformers Trainer.

The model is transformers' ``LlavaForConditionalGeneration``: a CLIP-style vision tower, a
projector, and a causal LM. As in the paper (which follows LLaVA-1.5 through XTuner), the language
model and the vision tower get adapters with separate settings, as two adapter groups
(:mod:`moslora.model.groups`): LLM r=64, alpha=128; vision r=64, alpha=16; dropout 0.05; AdamW at
lr 2e-5 for one epoch, 3% linear warmup then cosine decay; optionally a 4-bit NF4 language model
with double quantization (QLoRA; the vision tower and projector stay in full precision).

The pieces, one module each: :mod:`~moslora.train.llava.recipe` (the knobs and the two adapter
groups), :mod:`~moslora.train.llava.data` (LLaVA conversation JSON, templates, tokenizing, dataset
and collator), :mod:`~moslora.train.llava.model` (loading, merged export) and
:mod:`~moslora.train.llava.train` (the run). Outputs under ``output``: the adapter groups
(:mod:`moslora.io.groups`), adapter-only checkpoints, metrics, a loss curve;
:func:`export_merged_llava` writes a plain model for evaluation tools.
"""

from moslora.train.llava.data import (
    ConversationCollator,
    ConversationDataset,
    ConversationRows,
    read_conversations,
    tokenize_conversation,
)
from moslora.train.llava.model import export_merged_llava, load_llava
from moslora.train.llava.recipe import LANGUAGE_MODEL, LLAVA_SYSTEM, VISION_TOWER, LlavaRecipe
from moslora.train.llava.train import train_llava

__all__ = [
    "LANGUAGE_MODEL",
    "LLAVA_SYSTEM",
    "VISION_TOWER",
    "ConversationCollator",
    "ConversationDataset",
    "ConversationRows",
    "LlavaRecipe",
    "export_merged_llava",
    "load_llava",
    "read_conversations",
    "tokenize_conversation",
    "train_llava",
]
