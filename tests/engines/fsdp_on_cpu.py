"""Test-only launcher: ``moslora train`` (or a test script) under accelerate's FSDP on CPU processes (gloo).

accelerate enables FSDP only for accelerator devices: on CPU it silently runs plain DDP instead
(``AcceleratorState`` sets ``distributed_type = FSDP`` only in its GPU branch). torch's FSDP1 and
FSDP2 themselves run on CPU with gloo, so this launcher makes that one decision the GPU branch
makes, and nothing else: with an FSDP plugin and a multi-CPU run, the state is FSDP. Everything
after it (accelerate's wrapping, Trainer's FSDP paths, moslora's saving) is the real code.
Run with ``accelerate launch --config_file <fsdp config with use_cpu: true> tests/engines/fsdp_on_cpu.py train ...``,
or ``... tests/engines/fsdp_on_cpu.py SCRIPT.py ARGS`` to run a script instead of ``moslora``.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from moslora.model.sharded import exit_process

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # Each AcceleratorState() made later (accelerate's AcceleratedOptimizer makes one while the
        # trainer prepares) copies PartialState's shared state over its own: it must say FSDP too.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

def _run() -> int:
    if sys.argv[1].endswith(".py"):
        sys.argv = sys.argv[1:]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
    from moslora.cli.main import main

    return main(sys.argv[1:])


if __name__ == "__main__":
    exit_process(_run() or 0)
