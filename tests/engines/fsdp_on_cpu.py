"""Test-only launcher: ``moslora train`` under accelerate's FSDP on CPU processes (gloo).

accelerate enables FSDP only for accelerator devices: on CPU it silently runs plain DDP instead
(``AcceleratorState`` sets ``distributed_type = FSDP`` only in its GPU branch). torch's FSDP1 and
FSDP2 themselves run on CPU with gloo, so this launcher makes that one decision the GPU branch
makes, and nothing else: with an FSDP plugin and a multi-CPU run, the state is FSDP. Everything
after it (accelerate's wrapping, Trainer's FSDP paths, moslora's saving) is the real code.
Run with ``accelerate launch --config_file <fsdp config with use_cpu: true> tests/engines/fsdp_on_cpu.py train ...``.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from moslora.cli.main import main

    sys.exit(main(sys.argv[1:]))
