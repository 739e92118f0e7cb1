"""Evaluating causal LMs with MoSLoRA adapters the way the paper did (``moslora eval``)."""

from moslora.eval.evaluate import evaluate, evaluate_adapter
from moslora.eval.tasks import TASKS, choices, extract_answer

__all__ = ["TASKS", "choices", "evaluate", "evaluate_adapter", "extract_answer"]
