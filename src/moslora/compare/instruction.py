"""Instruction tasks (``kind: instruction``): the paper's LLM pipeline. A causal LM is
instruction-tuned on rows in the LLM-Adapters format (Alpaca prompt, loss on the response only, as
``moslora train`` does) and scored on held-out rows by :func:`moslora.eval.evaluate`.

Two row formats:

- the paper's **label format**: the options are listed in the instruction, the response is
  ``the correct answer is answer2`` and the answer label is read back by the paper's extraction for
  one of its eight data sets (``scoring: generate``), or the most likely label is taken
  (``scoring: loglik``);
- **choice text**: each row also carries ``options`` (a list of strings), the response trained on
  is the gold option's text and the prediction is the option with the highest mean log-probability
  per token (``scoring: choice``).

With ``frozen_layers = k`` the embeddings and the bottom k decoder layers get no adapters; their
output is then a fixed function of the tokens, so :class:`InstructionData` computes it once per
training row and every run trains only the layers above on it (the whole model scores).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moslora.compare.methods import method_config
from moslora.compare.task import Budget
from moslora.model.inject import adapter_layers, inject
from moslora.train.recipe import LLM_TARGETS


# fp32: everything in fp32. bf16: weights and adapters stay fp32, matrix products run in bf16 under
# autocast (training, the frozen bottom's cache, scoring): 4× faster on CPUs with AMX, as on GPUs.
PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The autocast context of ``precision`` (a no-op for fp32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class InstructionTask(Budget):
    """A causal LM instruction-tuned on LLM-Adapters rows (``instruction``, ``input``, ``output``,
    ``answer``; ``options`` for choice scoring) and scored on held-out rows.

    Training: each row is the Alpaca prompt plus its ``output`` (cut at ``max_length`` tokens, EOS
    appended), the loss on the response tokens only. Scoring: :func:`moslora.eval.evaluate` with
    ``scoring`` (``generate``: greedy decoding of up to ``max_new_tokens`` tokens, then the first
    answer label of ``dataset`` in the text, no label counting as wrong; ``loglik``: the most likely
    label; ``choice``: the option text with the highest mean log-probability per token). ``model``
    is a model directory, a hub id, or a ``.gguf`` file. ``precision`` (see :data:`PRECISIONS`) is
    the same for every method, so it never favours one.
    """

    name: str
    model: str
    dataset: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    steps: int = 100
    batch_size: int = 8
    max_length: int = 256
    warmup_steps: int = 0
    log_every: int = 10
    scoring: str = "generate"
    max_new_tokens: int = 16
    eval_batch_size: int = 16
    frozen_layers: int = 0
    alpha_over_r: float = 2.0
    target_modules: list[str] | str = field(default_factory=lambda: list(LLM_TARGETS))
    modules_to_save: list[str] = field(default_factory=list)
    dropout: float = 0.05
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    precision: str = "fp32"
    quick_steps: int | None = None
    quick_sizes: tuple[int, int] | None = None
    quick_learning_rate: float | None = None
    description: str = ""
    kind = "instruction"

    def __post_init__(self) -> None:
        from moslora.eval.evaluate import SCORINGS, choice_pairs
        from moslora.eval.tasks import TASKS

        if self.dataset not in TASKS:
            raise ValueError(f"field 'dataset' must be one of the paper's data sets {sorted(TASKS)}, got {self.dataset!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"field 'scoring' must be one of {SCORINGS}, got {self.scoring!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"field 'precision' must be one of {PRECISIONS}, got {self.precision!r}")
        if self.scoring == "choice":
            for split in ("validation", "test"):
                try:
                    choice_pairs(getattr(self, split), [""] * len(getattr(self, split)))
                except ValueError as e:
                    raise ValueError(f"field {split!r}: {e}") from None

    def _kind_settings(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "scoring": self.scoring, "max_length": self.max_length,
                "max_new_tokens": self.max_new_tokens, "frozen_layers": self.frozen_layers, "precision": self.precision}

    def chance(self) -> float | None:
        """Choice scoring: the mean of 1/(number of options) over the test rows (a uniform guess)."""
        if self.scoring != "choice":
            return None
        return sum(1 / len(row["options"]) for row in self.test) / len(self.test)

    def prepare(self) -> "InstructionData":
        return InstructionData(self)


class InstructionData:
    """An instruction task's base model (loaded once, copied for every run), its tokenizer and its
    training rows tokenized once, as ``moslora train`` tokenizes them; with ``frozen_layers`` the
    training rows are the frozen bottom's output instead of token ids."""

    def __init__(self, task: InstructionTask) -> None:
        from moslora.train.data import has_response, tokenize_row
        from moslora.train.model import load_model

        self.task = task
        # fp32 weights and adapters; task.precision says whether products run in bf16 (autocast).
        self.base, self.tokenizer = _quietly(lambda: load_model(task.model, precision="fp32", for_training=False))
        if torch.cuda.is_available():
            self.base = self.base.to("cuda")
        self.base.requires_grad_(False)
        # Right padding for training: Llama-style models take positions from the cache, not the mask
        # (scoring pads left for generation and puts it back).
        self.tokenizer.padding_side = "right"
        rows = [tokenize_row(self.tokenizer, row, cutoff_len=task.max_length) for row in task.train]
        # A row whose response is cut away by max_length teaches nothing (and makes a 0/0 loss).
        self.train = [row for row in rows if has_response(row)]
        if not self.train:
            raise ValueError(f"task {task.name}: every training row's response is cut away by max_length={task.max_length}")
        if len(self.train) < len(rows):
            warnings.warn(f"task {task.name}: {len(rows) - len(self.train)} of {len(rows)} training rows dropped: "
                          f"max_length={task.max_length} cuts their response away", stacklevel=2)
        self.scoring_cache: dict[str, list[dict[str, Any]]] = {}
        if task.frozen_layers:
            decoder_layers(self.base, task.frozen_layers)  # refuse a model it cannot split before any work
            with autocast(task.precision, self.device):
                self.train = bottom_states(self.base, task.frozen_layers, self.train)
            if task.scoring == "choice":
                self.scoring_cache = {split: self._choice_sequences(split) for split in ("validation", "test") if getattr(task, split)}

    def _choice_sequences(self, split: str) -> list[dict[str, Any]]:
        """Every option of every row of ``split`` as the tokens ``evaluate`` scores, with the frozen
        bottom's states for them (a row's prompt is run once for all its options)."""
        from moslora.eval.evaluate import choice_pairs, continuation_tokens
        from moslora.train.data import prompt

        rows = getattr(self.task, split)
        pairs = choice_pairs(rows, [prompt(r["instruction"], r.get("input")) for r in rows])
        tokens = [continuation_tokens(self.tokenizer, context, option) for context, option in pairs]
        sequences, at = [], 0
        with autocast(self.task.precision, self.device):
            for row in rows:
                mine = tokens[at : at + len(row["options"])]
                at += len(row["options"])
                states = shared_prompt_states(self.base, self.task.frozen_layers, mine)
                sequences += [{"inputs_embeds": st, "input_ids": ids, "start": start} for st, (ids, start) in zip(states, mine)]
        return sequences

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        from transformers import DataCollatorForSeq2Seq

        from moslora.compare.classification import pad_states
        from moslora.train.data import IGNORE_INDEX

        if self.task.frozen_layers:
            return lambda batch: pad_states(batch, label_pad=IGNORE_INDEX)
        return DataCollatorForSeq2Seq(self.tokenizer, pad_to_multiple_of=8, padding=True, return_tensors="pt")

    def build(self, method: str, seed: int, r: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # A (then M) are drawn from it, the same A for every method
        model = inject(copy.deepcopy(self.base), method_config(self.task, method, r))
        model.config.use_cache = False  # training only; generation turns its cache on itself
        if self.task.frozen_layers:
            frozen = {name for name, _ in adapter_layers(model) if _layer_index(name) is not None and _layer_index(name) < self.task.frozen_layers}
            if frozen:
                raise ValueError(f"task {self.task.name}: target_modules adapt {sorted(frozen)[0]} (and {len(frozen) - 1} more) "
                                 f"below frozen_layers={self.task.frozen_layers}, whose output is cached")
        return model

    def training_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the Trainer trains: the model itself, or (frozen bottom) the same model fed the cached states."""
        return TopOfCausalLM(model, self.task.frozen_layers) if self.task.frozen_layers else model

    def score(self, model: torch.nn.Module, split: str) -> dict[str, Any]:
        from moslora.eval.evaluate import evaluate, pick_options

        task = self.task
        if split in self.scoring_cache:  # choice scoring from the frozen bottom's cached states
            rows = getattr(task, split)
            was_training = model.training
            model.eval()
            try:
                with autocast(task.precision, self.device):
                    flat = TopOfCausalLM(model, task.frozen_layers).continuation_scores(self.scoring_cache[split], task.eval_batch_size)
            finally:
                model.train(was_training)
            answers = [p["extracted"] for p in pick_options([r["options"] for r in rows], flat)]
            correct = sum(a == r["answer"] for a, r in zip(answers, rows))
            return {"metric": "accuracy", "value": correct / len(rows), "no_answer": 0, "answers": answers}
        with autocast(task.precision, self.device):
            result = evaluate(model, self.tokenizer, getattr(task, split), task.dataset, scoring=task.scoring,
                              batch_size=task.eval_batch_size, max_new_tokens=task.max_new_tokens)
        return {"metric": "accuracy", "value": result["accuracy"], "no_answer": result["no_answer"],
                "answers": [example["extracted"] for example in result["examples"]]}


def _quietly(load: Callable[[], Any]) -> Any:
    """``load()`` without its progress bars (transformers' GGUF dequantization draws one on stderr
    with plain tqdm for every load); what it printed is shown if it fails."""
    import contextlib
    import io
    import sys

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return load()
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


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


def _layer_index(name: str) -> int | None:
    found = re.match(r"model\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


class _Stop(Exception):
    """Ends a forward pass once the frozen bottom's output is captured."""


@torch.no_grad()
def bottom_states(model: torch.nn.Module, frozen: int, rows: list[dict[str, Any]], batch: int = 16) -> list[dict[str, Any]]:
    """Each row's hidden states entering decoder layer ``frozen`` (its length × hidden, fp32),
    with its labels, in the order of ``rows``. Rows of similar length are run together,
    right-padded: with causal attention a token's state never depends on the padding after it."""
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    layers = decoder_layers(model, frozen)
    handle = layers[frozen].register_forward_pre_hook(capture, with_kwargs=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[dict[str, Any] | None] = [None] * len(rows)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    try:
        for start in range(0, len(rows), batch):
            chunk = by_length[start : start + batch]
            length = max(len(rows[i]["input_ids"]) for i in chunk)
            ids = torch.tensor([rows[i]["input_ids"] + [0] * (length - len(rows[i]["input_ids"])) for i in chunk])
            mask = torch.tensor([[1] * len(rows[i]["input_ids"]) + [0] * (length - len(rows[i]["input_ids"])) for i in chunk])
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
            hidden = captured.pop()
            for i, h in zip(chunk, hidden):
                out[i] = {"inputs_embeds": h[: len(rows[i]["input_ids"])].float().cpu().clone(), "labels": list(rows[i]["labels"])}
    finally:
        handle.remove()
        model.train(was_training)
    return out


@torch.no_grad()
def shared_prompt_states(model: torch.nn.Module, frozen: int, sequences: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """The states entering decoder layer ``frozen`` for sequences that share a prompt: each is
    ``(ids, start)`` with ``ids[:start]`` the prompt and the rest its continuation (an option). The
    prompt runs once, filling the bottom layers' key/value cache; the continuations then run
    together from that cache, right-padded. Positions and causal attention are those of each whole
    sequence, so the states are the ones :func:`bottom_states` gives for the whole sequences (up to
    round-off), at a fraction of the cost. Sequences whose prompts differ (a token merged across the
    boundary) run whole."""
    from transformers import DynamicCache

    prompts = {tuple(ids[:start]) for ids, start in sequences}
    if len(prompts) != 1:
        return [state["inputs_embeds"] for state in bottom_states(model, frozen, [{"input_ids": ids, "labels": []} for ids, _ in sequences])]
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    layers = decoder_layers(model, frozen)
    handle = layers[frozen].register_forward_pre_hook(capture, with_kwargs=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        prompt = torch.tensor([list(next(iter(prompts)))], device=device)
        cache = DynamicCache(config=model.config)
        try:
            model(input_ids=prompt, cache=cache, use_cache=True)
        except _Stop:
            pass
        head = captured.pop()[0]
        n, length, width = len(sequences), max(len(ids) - start for ids, start in sequences), prompt.shape[1]
        ids = torch.tensor([ids[start:] + [0] * (length - len(ids) + start) for ids, start in sequences], device=device)
        mask = torch.tensor([[1] * (width + len(i) - s) + [0] * (length - len(i) + s) for i, s in sequences], device=device)
        cache.batch_repeat_interleave(n)
        positions = torch.arange(width, width + length, device=device)[None].expand(n, length)
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        except _Stop:
            pass
        tails = captured.pop()
    finally:
        handle.remove()
        model.train(was_training)
    return [torch.cat([head, tail[: len(i) - s]]).float().cpu() for tail, (i, s) in zip(tails, sequences)]


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
        """Mean log-probability per token of each cached sequence's continuation (its tokens
        ``start`` … end): :func:`moslora.eval.evaluate.continuation_logprobs` with ``mean=True``,
        from cached states."""
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
                scores.append(float(logp.gather(-1, ids[start:end, None]).mean()))
        return scores
