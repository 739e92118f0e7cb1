"""Instruction tasks (``kind: instruction``): the paper's LLM pipeline. A causal LM is
instruction-tuned on rows in the LLM-Adapters format (Alpaca prompt, loss on the response only, as
``moslora train`` does) and scored on held-out rows by :func:`moslora.eval.evaluate`.

Two row formats:

- the paper's **label format**: the options are listed in the instruction, the response is
  ``the correct answer is answer2`` and the answer label is read back by the paper's extraction for
  one of its eight data sets (``scoring: generate``), or the most likely label is taken
  (``scoring: loglik``);
- **choice text**: each row also carries ``options`` (a list of strings), the response trained on
  is the gold option's text and the prediction is the option with the highest log-probability
  per character (``scoring: choice``).

With ``frozen_layers = k`` the embeddings and the bottom k decoder layers get no adapters (targets
named plainly match in the layers above only); their output is then a fixed function of the
tokens, so :class:`InstructionData` computes it once per training row that a run uses and every
run trains only the layers above on it (the whole model scores).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moslora.compare.causal_cache import TopOfCausalLM, bottom_states, decoder_layers, frozen_modules, layer_index
from moslora.compare.methods import method_config
from moslora.compare.task import Budget
from moslora.model.inject import inject
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
    label; ``choice``: the option text with the highest log-probability per character). ``model``
    is a model directory, a hub id, or a ``.gguf`` file. ``precision`` (see :data:`PRECISIONS`) is
    the same for every method, so it never favours one. Rows may say which data set they come from
    (``set``, as a task pooling several sets does): scoring then also gives each set's accuracy
    (``by_set``) and the report a column per set and their average.
    """

    name: str
    model: str
    dataset: str | None  # generate / loglik: whose answer extraction scores (choice: optional)
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
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    precision: str = "fp32"
    quick_steps: int | None = None
    quick_sizes: tuple[int, int] | None = None
    quick_learning_rate: float | None = None
    description: str = ""
    source: str = ""  # where the rows come from, for the results file (e.g. "BIG-bench social_iqa")
    kind = "instruction"

    def __post_init__(self) -> None:
        from moslora.eval.evaluate import SCORINGS, choice_pairs
        from moslora.eval.tasks import TASKS

        if self.scoring not in SCORINGS:
            raise ValueError(f"field 'scoring' must be one of {SCORINGS}, got {self.scoring!r}")
        if self.dataset is None and self.scoring != "choice":
            raise ValueError(f"field 'dataset' is needed by scoring {self.scoring!r} (whose answer extraction reads the "
                             f"responses): one of the paper's data sets {sorted(TASKS)}")
        if self.dataset is not None and self.dataset not in TASKS:
            raise ValueError(f"field 'dataset' must be one of the paper's data sets {sorted(TASKS)}, got {self.dataset!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"field 'precision' must be one of {PRECISIONS}, got {self.precision!r}")
        for split in ("validation", "test"):
            rows = getattr(self, split)
            labelled = [isinstance(row.get("set"), str) and row["set"] != "" for row in rows]
            if any(labelled) and not all(labelled):
                raise ValueError(f"field {split!r}: row {labelled.index(False) + 1} has no 'set' (a non-empty string), "
                                 "though other rows do: give every row its set, or none")
        if self.scoring == "choice":
            for split in ("validation", "test"):
                try:
                    choice_pairs(getattr(self, split), [""] * len(getattr(self, split)))
                except ValueError as e:
                    raise ValueError(f"field {split!r}: {e}") from None

    @property
    def exclude_modules(self) -> str | None:
        """With ``frozen_layers`` and targets named plainly (``[q_proj, v_proj]``): the frozen bottom's
        modules, so the names match in the layers above only. A regex of targets is the user's own
        and is checked instead (:func:`check_targets`)."""
        if self.frozen_layers and not isinstance(self.target_modules, str):
            return frozen_modules(self.frozen_layers)
        return None

    def _kind_settings(self) -> dict[str, Any]:
        sets = set_sizes(self.test)
        return {"dataset": self.source or None, "extraction": self.dataset, "scoring": self.scoring, "max_length": self.max_length,
                "choice_normalization": "character" if self.scoring == "choice" else None,
                "max_new_tokens": self.max_new_tokens, "frozen_layers": self.frozen_layers, "precision": self.precision,
                **({"test_sets": sets} if sets else {})}

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
        check_targets(task)  # a task file's inconsistencies, before the weights load or anything is cached
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
        self._bottom: dict[int, dict[str, Any]] = {}  # training row → the frozen bottom's states, made when first used
        self.scoring_cache: dict[str, list[dict[str, Any]]] = {}
        if task.frozen_layers and task.scoring == "choice":
            self.scoring_cache = {split: self._choice_sequences(split) for split in ("validation", "test") if getattr(task, split)}

    def examples(self, indices: list[int]) -> list[dict[str, Any]]:
        """The training examples at ``indices``: tokenized rows, or (``frozen_layers``) the frozen
        bottom's states for them, computed the first time a row is used, so only the rows a budget
        reaches are ever run through the bottom."""
        if not self.task.frozen_layers:
            return [self.train[i] for i in indices]
        missing = sorted(set(indices) - self._bottom.keys())
        if missing:
            with autocast(self.task.precision, self.device):
                self._bottom.update(zip(missing, bottom_states(self.base, self.task.frozen_layers, [self.train[i] for i in missing])))
        return [self._bottom[i] for i in indices]

    def _choice_sequences(self, split: str) -> list[dict[str, Any]]:
        """Every option of every row of ``split`` as the tokens ``evaluate`` scores, with the frozen
        bottom's states for them. Whole sequences in batches of similar length: on two CPU cores
        this took half the time of running each row's prompt once and its options from its cache."""
        from moslora.eval.evaluate import choice_pairs, continuation_tokens
        from moslora.train.data import prompt

        rows = getattr(self.task, split)
        pairs = choice_pairs(rows, [prompt(r["instruction"], r.get("input")) for r in rows])
        tokens = [continuation_tokens(self.tokenizer, context, option) for context, option in pairs]
        with autocast(self.task.precision, self.device):
            states = bottom_states(self.base, self.task.frozen_layers, [{"input_ids": ids, "labels": []} for ids, _ in tokens])
        return [{"inputs_embeds": state["inputs_embeds"], "input_ids": ids, "start": start} for state, (ids, start) in zip(states, tokens)]

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
        return model

    def training_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the Trainer trains: the model itself, or (frozen bottom) the same model fed the cached states."""
        return TopOfCausalLM(model, self.task.frozen_layers) if self.task.frozen_layers else model

    def score(self, model: torch.nn.Module, split: str) -> dict[str, Any]:
        from moslora.eval.evaluate import evaluate, per_character, pick_options

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
            options = [r["options"] for r in rows]
            flat = per_character(flat, [option for opts in options for option in opts])
            answers = [p["extracted"] for p in pick_options(options, flat)]
            correct = sum(a == r["answer"] for a, r in zip(answers, rows))
            return {"metric": "accuracy", "value": correct / len(rows), "no_answer": 0, "answers": answers,
                    **_by_set(rows, answers)}
        with autocast(task.precision, self.device):
            result = evaluate(model, self.tokenizer, getattr(task, split), task.dataset, scoring=task.scoring,
                              batch_size=task.eval_batch_size, max_new_tokens=task.max_new_tokens)
        answers = [example["extracted"] for example in result["examples"]]
        return {"metric": "accuracy", "value": result["accuracy"], "no_answer": result["no_answer"], "answers": answers,
                **_by_set(getattr(task, split), answers)}


def set_sizes(rows: list[dict[str, Any]]) -> dict[str, int]:
    """set → its number of rows, in the order the sets first appear; empty when the rows carry no
    ``set`` (a task pooling several data sets labels each row with its own, see
    :mod:`moslora.compare.sources`)."""
    sizes: dict[str, int] = {}
    for row in rows:
        if row.get("set"):
            sizes[row["set"]] = sizes.get(row["set"], 0) + 1
    return sizes


def accuracy_by_set(rows: list[dict[str, Any]], answers: list[str | None]) -> dict[str, float]:
    """set → the share of its rows whose answer is the row's ``answer`` (sets in the order they
    first appear)."""
    sizes = set_sizes(rows)
    correct = dict.fromkeys(sizes, 0)
    for row, answer in zip(rows, answers, strict=True):
        if row.get("set"):
            correct[row["set"]] += answer == row["answer"]
    return {name: correct[name] / n for name, n in sizes.items()}


def _by_set(rows: list[dict[str, Any]], answers: list[str | None]) -> dict[str, Any]:
    """``{"by_set": accuracy_by_set(...)}`` for rows that carry their set, else nothing (a task of
    one data set records what it always did)."""
    return {"by_set": accuracy_by_set(rows, answers)} if set_sizes(rows) else {}


def check_targets(task: InstructionTask) -> list[str]:
    """The modules ``task``'s adapters wrap, found on the model's skeleton (its config, no weights),
    so a task file's mistakes are reported before the weights load or any state is cached: a
    ``frozen_layers`` the model cannot split, targets that match nothing, or a regex that reaches
    into the frozen bottom (plain names are kept above it by ``exclude_modules``)."""
    from moslora.model.inject import find_targets
    from moslora.train.model import load_skeleton

    skeleton = _quietly(lambda: load_skeleton(task.model))
    if task.frozen_layers:
        decoder_layers(skeleton, task.frozen_layers)
    try:
        names = find_targets(skeleton, method_config(task, "lora", 8))
    except ValueError as e:
        raise ValueError(f"task {task.name}: {e}") from None
    below = [name for name in names if layer_index(name) is not None and layer_index(name) < task.frozen_layers]
    if below:
        raise ValueError(f"task {task.name}: target_modules adapt {len(below)} module(s) below frozen_layers={task.frozen_layers}, "
                         f"whose output is cached (first: {below[0]}); name the modules plainly "
                         f"(e.g. [q_proj, v_proj]) to adapt them in the layers above only")
    return names


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
