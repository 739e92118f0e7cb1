"""Evaluating causal LMs with MoSLoRA adapters the way the paper did (``moslora eval``)."""

# Exports resolve on first use (PEP 562), so importing a light submodule such as ``moslora.eval.tasks`` (as the
# command line does to build its parser) does not pull in transformers.
import importlib

_EXPORTS = {
    "TASKS": "moslora.eval.tasks",
    "choices": "moslora.eval.tasks",
    "evaluate": "moslora.eval.evaluate",
    "evaluate_adapter": "moslora.eval.evaluate",
    "extract_answer": "moslora.eval.tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
