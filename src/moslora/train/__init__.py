"""Fine-tuning causal LMs with MoSLoRA on the transformers Trainer (``moslora train``)."""

from moslora.train.data import build_datasets, prompt, read_rows, tokenize_row
from moslora.train.model import load_model
from moslora.train.recipe import Recipe, load_recipe
from moslora.train.trainer import NonFiniteLossError, TrainResult, train_causal_lm

__all__ = [
    "NonFiniteLossError",
    "Recipe",
    "TrainResult",
    "build_datasets",
    "load_model",
    "load_recipe",
    "prompt",
    "read_rows",
    "tokenize_row",
    "train_causal_lm",
]
