"""``moslora`` (the command line) that holds the run still once checkpoint ``STOP_AT`` is written.

The SIGKILL test kills training part way through. Waiting for a checkpoint file and then killing
is a race: on an idle machine the tiny run can finish its remaining steps before the kill lands.
Here the Trainer, right after writing checkpoint ``STOP_AT`` completely, prints ``held`` and
sleeps, so the kill always lands between that checkpoint and the next step.

    python stop_after_checkpoint.py STOP_AT train --model ... (the arguments of `moslora`)
"""

import sys
import time

from transformers import Trainer

from moslora.cli.main import main

STOP_AT = int(sys.argv.pop(1))
_save_checkpoint = Trainer._save_checkpoint


def _save_then_hold(self, *args, **kwargs):
    _save_checkpoint(self, *args, **kwargs)
    if self.state.global_step == STOP_AT:
        print("held", flush=True)
        while True:
            time.sleep(60)


Trainer._save_checkpoint = _save_then_hold

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
