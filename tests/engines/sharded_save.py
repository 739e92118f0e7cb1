"""Run under ``torchrun --nproc_per_node 2``: save_adapter on a model sharded by torch's FSDP1 or
FSDP2 directly (``python sharded_save.py fsdp1|fsdp2 OUT``).

Every process injects the same adapter (same seed) and makes it look trained; process 0 keeps the
whole adapter as the reference. The model is then sharded, and the script checks that it really
is, that ``save_adapter`` called on every process writes exactly the reference (process 0 only),
that putting tensors back into the shards and gathering them again is exact, and (FSDP1) that
``save_adapter`` on the inner module, where the shards cannot be gathered, refuses with a clear
error on every process and writes nothing. Prints ``OK`` on process 0 when all held.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import moslora
from moslora.io.native import WEIGHTS_NAME, AdapterFormatError, adapter_contents
from moslora.model.sharded import exit_process, gather_adapter, place_adapter_tensors, sharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import perturb, tiny_llama  # noqa: E402


def main(kind: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb(model)
    _, reference = adapter_contents(model)
    layer_cls = type(model.model.layers[0])
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({layer_cls}))
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    assert sharding(wrapped) == kind, sharding(wrapped)

    moslora.save_adapter(wrapped, out / "saved")
    dist.barrier()
    if rank == 0:
        saved = load_file(out / "saved" / WEIGHTS_NAME)
        assert saved.keys() == reference.keys(), sorted(set(saved) ^ set(reference))
        for key in reference:
            assert torch.equal(saved[key], reference[key]), key
        assert moslora.read_adapter(out / "saved")[0].modules  # a valid native adapter

    zeros = {key: torch.zeros_like(t) for key, t in reference.items()}
    place_adapter_tensors(wrapped, zeros)
    assert all(not t.any() for t in gather_adapter(wrapped).values())
    place_adapter_tensors(wrapped, reference)
    assert all(torch.equal(t, reference[k]) for k, t in gather_adapter(wrapped).items())

    if kind == "fsdp1":
        # One FSDP unit holding everything: its inner module alone has only this process's flat slices.
        root_only = FSDP(moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(r=4, target_modules=["q_proj"])),
                         device_id=torch.device("cpu"), use_orig_params=True)
        try:
            moslora.save_adapter(root_only.module, out / "refused")
        except AdapterFormatError as e:
            assert "sharded engine" in str(e) and "every process" in str(e), e
        else:
            raise AssertionError("save_adapter wrote a sharded adapter")
        assert not (out / "refused").exists()
    dist.barrier()
    if rank == 0:
        print("OK")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_process(0)  # FSDP2 keeps a reference to the group: leave before its threads meet shutdown
