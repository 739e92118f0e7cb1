"""The frozen bottom of a causal LM, computed once.

With ``frozen_layers = k`` the embeddings and decoder layers 0..k−1 carry no adapter, so the hidden
states entering layer k are a fixed function of the tokens. :func:`bottom_states` computes them
once per sequence, and :class:`TopOfCausalLM` runs the same model from there: layers k.. (with their
adapters), the final norm, and the output head only where a token is predicted that counts.
Llama-style models (``model.model.layers``, logits = lm_head(h)) are supported.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch


def decoder_layers(model: torch.nn.Module, frozen: int) -> torch.nn.ModuleList:
    """The decoder's layer stack (``model.model.layers``, as Llama, Mistral and Qwen2 have it),
    checked to leave layers above ``frozen``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"frozen_layers needs a decoder with model.layers (Llama-style); {type(model).__name__} has none")
    if frozen >= len(layers):
        raise ValueError(f"frozen_layers={frozen} leaves no layer to adapt: the model has {len(layers)}")
    return layers


def frozen_modules(frozen: int) -> str:
    """A full-match regex of every module in the frozen bottom: the embeddings and decoder layers
    0..frozen−1 with everything inside them."""
    layers = "|".join(str(i) for i in range(frozen))
    return rf"model\.(embed_tokens|layers\.({layers}))(\..*)?"


def layer_index(name: str) -> int | None:
    """The decoder layer a module name belongs to (``model.layers.<i>.``), or ``None``."""
    found = re.match(r"model\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


class _Stop(Exception):
    """Ends a forward pass once the frozen bottom's output is captured."""


@contextlib.contextmanager
def _states_entering(model: torch.nn.Module, frozen: int) -> Iterator[Callable[..., torch.Tensor]]:
    """Yields ``run(**inputs)``: a forward pass of ``model`` (eval mode) cut at decoder layer
    ``frozen``, returning the hidden states that enter it."""
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    def run(**inputs: Any) -> torch.Tensor:
        try:
            model(**inputs)
        except _Stop:
            pass
        return captured.pop()

    handle = decoder_layers(model, frozen)[frozen].register_forward_pre_hook(capture, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        yield run
    finally:
        handle.remove()
        model.train(was_training)


@torch.no_grad()
def bottom_states(model: torch.nn.Module, frozen: int, rows: list[dict[str, Any]], batch: int = 16) -> list[dict[str, Any]]:
    """Each row's hidden states entering decoder layer ``frozen`` (its length × hidden, fp32),
    with its labels, in the order of ``rows``. Rows of similar length are run together,
    right-padded: with causal attention a token's state never depends on the padding after it."""
    device = next(model.parameters()).device
    out: list[dict[str, Any] | None] = [None] * len(rows)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    with _states_entering(model, frozen) as run:
        for start in range(0, len(rows), batch):
            chunk = by_length[start : start + batch]
            length = max(len(rows[i]["input_ids"]) for i in chunk)
            ids = torch.tensor([rows[i]["input_ids"] + [0] * (length - len(rows[i]["input_ids"])) for i in chunk])
            mask = torch.tensor([[1] * len(rows[i]["input_ids"]) + [0] * (length - len(rows[i]["input_ids"])) for i in chunk])
            hidden = run(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            for i, h in zip(chunk, hidden):
                out[i] = {"inputs_embeds": h[: len(rows[i]["input_ids"])].float().cpu().clone(), "labels": list(rows[i]["labels"])}
    return out


class TopOfCausalLM(torch.nn.Module):
    """A causal LM run from the hidden states entering decoder layer ``frozen``: the same module
    (same parameters, same adapters), its layer stack cut to the layers above for the length of a
    forward pass. Positions are 0..length−1 and the causal mask comes from ``attention_mask``, as
    in the whole model, so with right padding every real token sees exactly what it saw there.

    The output head runs only where it is needed: for the loss, on the positions that predict a
    labelled token (the response), which gives the model's own loss, the mean over those tokens of
    −log softmax(lm_head(h_t))[labels_{t+1}], at a fraction of the cost of all positions' logits
    (SmolLM2's vocabulary of 49,152 makes lm_head as costly as 8 decoder layers)."""

    def __init__(self, lm: torch.nn.Module, frozen: int) -> None:
        super().__init__()
        self.lm = lm
        self.frozen = frozen
        decoder_layers(lm, frozen)
        if getattr(lm.config, "final_logit_softcapping", None):
            raise ValueError(f"frozen_layers: {type(lm).__name__} post-processes its logits (softcapping); not supported")

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states (after the final norm) of the layers above ``frozen``."""
        inner = self.lm.model
        layers = inner.layers
        inner.layers = layers[self.frozen :]
        try:
            return inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        finally:
            inner.layers = layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        from moslora.train.data import IGNORE_INDEX

        hidden = self.hidden(inputs_embeds, attention_mask)
        targets = labels[:, 1:]
        where = targets != IGNORE_INDEX
        logits = self.lm.lm_head(hidden[:, :-1][where]).float()
        return {"loss": torch.nn.functional.cross_entropy(logits, targets[where])}

    @torch.no_grad()
    def continuation_scores(self, sequences: list[dict[str, Any]], batch_size: int = 16) -> list[float]:
        """Summed log-probability of each cached sequence's continuation (its tokens ``start`` …
        end): :func:`moslora.eval.evaluate.continuation_logprobs`, from cached states."""
        from moslora.compare.classification import pad_states

        scores = []
        for at in range(0, len(sequences), batch_size):
            chunk = sequences[at : at + batch_size]
            batch = pad_states([{"inputs_embeds": s["inputs_embeds"], "labels": 0} for s in chunk])
            hidden = self.hidden(batch["inputs_embeds"], batch["attention_mask"])
            for h, s in zip(hidden, chunk):
                ids = torch.as_tensor(s["input_ids"])
                start, end = s["start"], len(ids)
                logp = torch.log_softmax(self.lm.lm_head(h[start - 1 : end - 1]).float(), dim=-1)
                scores.append(float(logp.gather(-1, ids[start:end, None]).sum()))
        return scores
