"""Files: reading and writing adapters and converting between formats, never changing a model.

``native`` (moslora's own format), ``peft_format`` (PEFT and the authors' checkpoints),
``diffusers_format``, ``groups`` (one adapter per group plus a manifest), ``export`` (to plain
LoRA), ``load`` (the public loaders: pick the reader, hand the result to :mod:`moslora.model.place`),
``atomic`` (crash-safe writes)."""
