"""Fine-tuning causal LMs with MoSLoRA on the transformers Trainer (``moslora train``)."""

# Exports resolve on first use (PEP 562), so importing a light submodule such as ``moslora.train.recipe`` (as the
# command line does to build its parser) does not pull in transformers.
import importlib

_EXPORTS = {
    "NonFiniteLossError": "moslora.hf.trainer",
    "Recipe": "moslora.train.recipe",
    "TrainResult": "moslora.train.run",
    "build_datasets": "moslora.train.data",
    "load_model": "moslora.train.model",
    "load_recipe": "moslora.train.recipe",
    "prompt": "moslora.train.data",
    "read_rows": "moslora.train.data",
    "tokenize_row": "moslora.train.data",
    "train_causal_lm": "moslora.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
