"""What reaches the user's console: third-party noise filtered out, short progress bars off a terminal.

``import moslora`` installs the noise filters (:func:`filter_noise`), so a script that imports
moslora before transformers or peft gets them too. The command line calls :func:`setup` once,
first thing, which also switches the libraries' short progress bars off a terminal (a script can
call it too; ``examples/`` do).

**Noise.** transformers imports torchao, DeepSpeed and peft whenever they are installed, and peft
imports bitsandbytes, whether or not the run uses them; each then logs something at import. None
of it concerns what the user asked for, so each message is dropped by a filter on the one logger
that emits it, matching its text. Anything else those loggers say still gets through, and Python
warnings are not touched. Why each filter exists is written next to it in :data:`NOISE`.

**Progress bars.** Off a terminal (output piped to a file), the libraries' short bars (loading
weights, preprocessing a dataset) are switched off through their own environment variables (a
value the user set wins); moslora's bars of long work stay, compact (:mod:`moslora.train.progress`).
One short bar has no switch and stays: transformers' "Converting and de-quantizing GGUF tensors".
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    """A message that ``logger`` emits and the user never needs: dropped when it matches ``pattern``."""

    logger: str
    pattern: str
    why: str


NOISE = (
    Noise("torchao", r"^Failed to load .*\.so",
          "torchao (imported by transformers when installed) tries its CUDA kernels on every import; moslora never uses them"),
    Noise("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
          "torchao's import calls a torch API that torch has deprecated; nothing for a moslora user to do"),
    Noise("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
          "peft imports bitsandbytes (when installed), which looks for an optional faster CPU kernel on the Hub; "
          "moslora's 4-bit training switches off the CPU path that kernel speeds up"),
    Noise("DeepSpeed", r"^Setting accelerator to CPU",
          "transformers imports DeepSpeed (when installed), which announces on stdout that it found no GPU"),
    Noise("transformers.trainer_utils", r"^mtime may not be reliable on this filesystem",
          "Trainer sorting checkpoints on some filesystems; it falls back to step numbers, which is what moslora uses"),
)  # fmt: skip

# Each library's own switch for its short progress bars (weights loading, dataset preprocessing).
_SHORT_BARS_OFF = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_filtering = False


def filter_noise() -> None:
    """Install the filters of :data:`NOISE`, once. Before the libraries are imported is best (their
    messages come at import), but any time works: a logger's filters outlive its creation."""
    global _filtering
    if _filtering:
        return
    _filtering = True
    for noise in NOISE:
        # getLogger creates the logger now if the library has not yet; the library then finds it
        # with the filter on. A filter on a logger applies to the records that logger emits.
        logging.getLogger(noise.logger).addFilter(_DropMatching(noise.pattern))


def setup() -> None:
    """The command line's console: :func:`filter_noise`, and when stderr is not a terminal, the
    libraries' short progress bars off (they read these variables when they are imported)."""
    filter_noise()
    if not sys.stderr.isatty():
        for name, value in _SHORT_BARS_OFF.items():
            os.environ.setdefault(name, value)
