"""The maths of one adapted layer: the MoSLoRA wrapper and its layer kinds (``layers``), the
initial values of A and M (``init``), and writing ΔW into a (possibly quantized) weight (``weights``).
Knows nothing of models, files or training."""
