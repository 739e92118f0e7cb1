"""Initial values of A and of the mixer M.

B always starts at zero, so ΔW = s·B·M·A = 0 and an injected model equals its base whatever A and M are.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def init_A_(A: torch.Tensor, scheme: str) -> None:
    """Fill A in place: ``"kaiming"`` is kaiming-uniform with a=√5 (nn.Linear's and LoRA's default),
    ``"gaussian"`` is normal with std 1/r (PEFT's ``init_lora_weights="gaussian"``)."""
    if scheme == "kaiming":
        # For a conv A of shape (r, in, *k) the fan-in is in·∏k, exactly as for the base conv.
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    elif scheme == "gaussian":
        nn.init.normal_(A, std=1.0 / A.shape[0])
    else:
        raise ValueError(f"unknown init for A: {scheme!r}")


def init_mixer_(M: torch.Tensor, scheme: str) -> None:
    """Fill the r×r mixer in place.

    - ``"kaiming"``: kaiming-uniform with a=√5, the authors' ``lora_AB`` init (an ``nn.Linear(r, r)``).
    - ``"orthogonal"``: a random orthogonal matrix, so M·A keeps A's scale.
    - ``"identity"``: I, so the adapter starts as plain LoRA and the mixer can learn from there.
    - ``"two-subspace"``: ``[[I, I], [I, I]]`` with r/2-sized blocks. Splitting A into row halves
      A1, A2 and B into column halves B1, B2 gives ``B·M·A = (B1 + B2)(A1 + A2)``: the paper's
      "two-subspace mixing" of LoRA, written as a fixed mixer (freeze it with ``train_mixer=False``).
    """
    r = M.shape[0]
    with torch.no_grad():
        if scheme == "kaiming":
            nn.init.kaiming_uniform_(M, a=math.sqrt(5))
        elif scheme == "orthogonal":
            nn.init.orthogonal_(M)
        elif scheme == "identity":
            M.copy_(torch.eye(r, dtype=M.dtype, device=M.device))
        elif scheme == "two-subspace":
            if r % 2:
                raise ValueError(f"the two-subspace mixer needs an even rank, got r={r}")
            half = torch.eye(r // 2, dtype=M.dtype, device=M.device)
            M.copy_(torch.cat([torch.cat([half, half], 1), torch.cat([half, half], 1)], 0))
        else:
            raise ValueError(f"unknown mixer: {scheme!r}")
