"""``moslora compare``: LoRA vs MoSLoRA (and its init-only and orthogonal variants) on one task,
paired over seeds, each method at its own best learning rate, reported with confidence intervals.

- :mod:`moslora.compare.tasks`: what to train on (classification or instruction tasks: the built-in
  ``tweets`` and ``smollm2-tweets``, or a YAML file).
- :mod:`moslora.compare.runner`: the paired runs (same initial weights, A and data order per seed).
- :mod:`moslora.compare.stats`: mean ± std, paired differences, t and Wilcoxon tests.
- :mod:`moslora.compare.report`: the JSON, the Markdown and terminal tables, the figure.
"""
