"""Run under torchrun (2 processes, gloo): does ``destroy_process_group`` free the default group
when FSDP is first imported after the group starts, as a user's script does?

``import moslora`` comes first, as in a user's script; ``torch.distributed.fsdp`` is imported only
after ``init_process_group``. Prints ``OK`` on rank 0 when nothing but this script holds the
group after it is destroyed, else the number of references left and exits 1.
"""

import gc
import os
import sys

import torch.distributed as dist

import moslora  # noqa: F401  (what a user's script imports first)


def main() -> int:
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (the lazy import that used to bind the group)

    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    # getrefcount counts `group` here and its own argument: 2 when nothing else holds it.
    left = sys.getrefcount(group) - 2
    if left:
        print(f"the destroyed process group is still held by {left} references", file=sys.stderr, flush=True)
        return 1
    if int(os.environ["RANK"]) == 0:
        print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
