r"""PEFT's LoRA format, and the authors' MoSLoRA checkpoints that extend it.

Key layout of ``adapter_model.safetensors`` (what ``PeftModel.save_pretrained`` writes, adapter
name removed) for a module named ``<m>`` in the base model::

    base_model.model.<m>.lora_A.weight        r×in              (conv: r×in×k…)
    base_model.model.<m>.lora_B.weight        out×r             (conv: out×r×1…)
    base_model.model.<m>.lora_embedding_A     r×num_embeddings  (nn.Embedding)
    base_model.model.<m>.lora_embedding_B     dim×r
    base_model.model.<m>.<param>              a module of modules_to_save, whole
    base_model.model.<m>.base_layer.weight    an embedding's base weight (PEFT saves it when it adapts one)
    base_model.model.<m>.lora_AB.weight       r×r mixer: the authors' fork of PEFT 0.10 (``lora_use_mixer: true``)
    base_model.model.<m>.lora_mixer.weight    r×r mixer: the unmerged PEFT pull request's name
    base_model.model.<m>.lora_M.weight        r×r mixer: moslora's PEFT route (:mod:`moslora.peft`)

``adapter_config.json`` has ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``use_rslora``
(s = lora_alpha/r, or lora_alpha/√r), ``target_modules`` and ``fan_in_fan_out`` (true for GPT-2's
Conv1D, whose weight is stored in×out; A and B are laid out as for a linear layer all the same).
The PEFT route's folders with a mixer (what PEFT's ``save_pretrained`` writes for a
:class:`moslora.peft.LoraConfig`, and :func:`export_peft_mixer` from any MoSLoRA adapter) have
``peft_type`` :data:`PEFT_ROUTE_TYPE` and ``mixer`` (the init scheme) instead: stock PEFT refuses
them, as it would otherwise load A and B and drop M with only a warning.

The maths: PEFT computes ``y = W0·x + s·B·A·x``; the authors' fork ``y = W0·x + s·B·M·A·x`` with
``M = lora_AB.weight``. A MoSLoRA adapter (A, M, B) is written as the plain LoRA adapter
(A' = M·A, B) with the same r and alpha, which is exactly equal (:func:`moslora.core.layers.fold_mixer`).
Importing a plain adapter (A, B) under a mixer M sets A ← M⁻¹·A, so M·A is the imported A and the
outputs are unchanged; with the identity mixer (the default) A is kept bit for bit.

Every reader here turns a directory into moslora's native form (an
:class:`~moslora.model.description.AdapterDescription` and tensors keyed ``<m>.lora_A|lora_M|lora_B``),
so loading goes through :func:`moslora.model.place.place_adapter` and its checks. A tensor that cannot be placed is an error: a mixer is never dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from moslora.config import MIXERS, MoSLoRAConfig
from moslora.core.init import init_mixer_
from moslora.core.layers import fold_mixer
from moslora.io.atomic import atomic_write, atomic_write_json
from moslora.io.native import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME
from moslora.model.description import AdapterDescription, AdapterFormatError, LayerDescription
from moslora.model.inject import matches
from moslora.version import __version__

PREFIX = "base_model.model."
# The peft_type of a PEFT-route folder with a mixer. Stock PEFT looks a folder's peft_type up in its table
# of methods and raises KeyError with this value, so the value is what its user reads.
PEFT_ROUTE_TYPE = ("MOSLORA: a LoRA adapter with a mixer between A and B, which PEFT alone cannot run; load it with "
                   "moslora.peft.PeftModel.from_pretrained, or write a plain LoRA copy with `moslora export`")
_PART = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_M|lora_AB|lora_mixer)(\.weight)?|(?P<emodule>.+)\.(?P<epart>lora_embedding_[AB])")
# The layer kinds the PEFT route gives a mixer (see moslora.peft.layers).
_PEFT_ROUTE_KINDS = ("linear", "conv1d-transformers")
_ROLE = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_M": "lora_M", "lora_AB": "lora_M", "lora_mixer": "lora_M",
         "lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}  # fmt: skip


def is_peft_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a PEFT-style adapter (its config has a ``peft_type``)."""
    config = Path(directory) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "peft_type" in data


def read_peft_dir(
    directory: str | os.PathLike, *, allow_pickle: bool = False
) -> tuple[AdapterDescription, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a PEFT LoRA directory, with or without the authors' mixer, into moslora's native form.

    Returns ``(description, tensors, base_weights)``: the native description (its config has
    ``mixer="kaiming"``, the authors' init, when the checkpoint has mixers, else ``None``), the
    tensors keyed ``<m>.lora_A|lora_M|lora_B`` and ``<m>.<param>`` (modules_to_save), and the base
    weights PEFT stores for adapted embeddings, keyed ``<m>.weight``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    cfg = _read_config(directory / CONFIG_NAME)
    raw, source = _read_tensors(directory, allow_pickle)
    saved_patterns = cfg.get("modules_to_save") or []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    saved: dict[str, torch.Tensor] = {}
    base_weights: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: tensor {key!r} does not start with {PREFIX!r}, as PEFT's keys do")
        name = key[len(PREFIX) :]
        m = _PART.fullmatch(name)
        if m is not None:
            module, part = (m["module"], m["part"]) if m["module"] else (m["emodule"], m["epart"])
            if part.startswith("lora_embedding"):
                embeddings.add(module)
            role = _ROLE[part]
            if role in parts.setdefault(module, {}):
                raise AdapterFormatError(f"{source}: layer {module!r} has two {role} tensors (two of lora_M, lora_AB, lora_mixer?)")
            parts[module][role] = tensor
        elif name.endswith(".base_layer.weight"):
            base_weights[name[: -len(".base_layer.weight")] + ".weight"] = tensor
        elif _saved_module(name, saved_patterns) is not None:
            saved[name] = tensor
        else:
            raise AdapterFormatError(f"{source}: tensor {key!r} is neither a LoRA tensor nor part of modules_to_save; refusing to drop it")

    r, modules, tensors = cfg["r"], {}, {}
    for module, p in sorted(parts.items()):
        missing = [role for role in ("lora_A", "lora_B") if role not in p]
        if missing:
            raise AdapterFormatError(f"{source}: layer {module!r} has no {missing[0]} tensor")
        A, B, M = p["lora_A"], p["lora_B"].float(), p.get("lora_M")
        if B.ndim > 2:  # a conv's B is a 1×1… kernel
            if any(d != 1 for d in B.shape[2:]):
                raise AdapterFormatError(f"{source}: layer {module!r} has a lora_B of shape {tuple(B.shape)}; a conv LoRA's B is out×r×1…")
            B = B.flatten(1)
        if A.shape[0] != r or B.shape[1] != r or (M is not None and tuple(M.shape) != (r, r)):
            raise AdapterFormatError(f"{source}: layer {module!r} does not have rank r={r} (A {tuple(A.shape)}, B {tuple(B.shape)})")
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = A.float(), B
        shapes = {"lora_A": tuple(A.shape)}
        if M is not None:
            tensors[f"{module}.lora_M"] = M.float()
            shapes["lora_M"] = (r, r)
        shapes["lora_B"] = tuple(B.shape)
        modules[module] = LayerDescription(_kind(module, A, embeddings, cfg), A.shape[1], B.shape[0], shapes)
    if not modules:
        raise AdapterFormatError(f"{source}: no LoRA tensors (lora_A / lora_B) found")
    with_mixer = [m for m in modules if "lora_M" in modules[m].shapes]
    if with_mixer and len(with_mixer) != len(modules):
        plain = next(m for m in modules if m not in with_mixer)
        raise AdapterFormatError(f"{source}: layer {with_mixer[0]!r} has a mixer but {plain!r} has none; moslora needs one or the other throughout")
    if _config_says_mixer(cfg) and not with_mixer:
        raise AdapterFormatError(f"{directory / CONFIG_NAME} enables the mixer but {source} has no lora_M / lora_AB / lora_mixer tensors")

    saved_modules = sorted({_saved_module(k, saved_patterns) for k in saved})
    tensors.update(saved)
    try:
        config = MoSLoRAConfig(
            r=r, alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout") or 0.0, target_modules=sorted(modules),
            mixer=(cfg.get("mixer") or "kaiming") if with_mixer else None, use_rslora=bool(cfg.get("use_rslora", False)),
            modules_to_save=saved_modules or None,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: {e}") from e
    try:
        description = AdapterDescription(config, modules, tuple(saved_modules), cfg.get("base_model_name_or_path"), cfg.get("task_type"))
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: {e}") from None
    return description, tensors, base_weights


def read_mixer_checkpoint(directory: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[AdapterDescription, dict[str, torch.Tensor]]:
    """Read one of the authors' MoSLoRA checkpoints into moslora's native form (for :func:`moslora.load_adapter`)."""
    description, tensors, base_weights = read_peft_dir(directory, allow_pickle=allow_pickle)
    if not description.has_mixer:
        raise AdapterFormatError(
            f"{directory} is a plain LoRA adapter (no lora_AB / lora_mixer tensors); start MoSLoRA from it "
            "with moslora.import_lora(model, directory, mixer=...)"
        )
    if base_weights:
        raise AdapterFormatError(f"{directory}: a MoSLoRA checkpoint with base-layer weights ({next(iter(base_weights))!r}) is not supported")
    return description, tensors


def with_new_mixer(
    description: AdapterDescription, tensors: dict[str, torch.Tensor], mixer: str | None
) -> tuple[AdapterDescription, dict[str, torch.Tensor]]:
    """A plain LoRA adapter (A, B; no mixer) rewritten as MoSLoRA with a fresh ``mixer`` M and the same
    outputs: A ← M⁻¹·A, so M·A is the original A (with ``"identity"`` A is kept bit for bit;
    ``None`` leaves the adapter plain). ``"two-subspace"`` is singular and refused."""
    if mixer == "two-subspace":
        raise ValueError("the two-subspace mixer is singular, so no A gives the imported adapter's outputs under it")
    config = description.config.replace(mixer=mixer)
    if mixer is None:
        return description, tensors
    tensors, modules = dict(tensors), {}
    for name, layer in description.modules.items():
        M = torch.empty(config.r, config.r)
        init_mixer_(M, mixer)
        A = tensors[f"{name}.lora_A"]
        if mixer != "identity":
            A = torch.linalg.solve(M.double(), A.double().flatten(1)).view(A.shape).float()
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_M"] = A, M
        shapes = {"lora_A": layer.shapes["lora_A"], "lora_M": (config.r, config.r), "lora_B": layer.shapes["lora_B"]}
        modules[name] = LayerDescription(layer.kind, layer.in_features, layer.out_features, shapes)
    return description.replace(config=config, modules=modules), tensors


def peft_tensors(
    description: AdapterDescription, tensors: dict[str, torch.Tensor], *, prefix: str = "", keep_mixer: bool = False
) -> dict[str, torch.Tensor]:
    """The native adapter as PEFT's tensors: mixers folded into A (A' = M·A), PEFT's key names and
    layouts (a conv's B as an out×r×1… kernel), module names under ``prefix`` (a submodule path,
    for adapter groups). With ``keep_mixer`` each mixer is kept as the PEFT route's ``lora_M`` and A
    is left as it is. Every input tensor is used or this raises."""
    head = PREFIX + (prefix + "." if prefix else "")
    out, used = {}, set()
    for name, layer in description.modules.items():
        keys = [f"{name}.{attr}" for attr in ("lora_A", "lora_M", "lora_B")]
        A_key, M_key, B_key = keys
        if keep_mixer and M_key in tensors:
            A = tensors[A_key].float()
            out[f"{head}{name}.lora_M.weight"] = tensors[M_key].float()
        else:
            A = fold_mixer(tensors[A_key], tensors.get(M_key))
        B = tensors[B_key].float()
        used.update(k for k in keys if k in tensors)
        if layer.kind == "embedding":
            out[f"{head}{name}.lora_embedding_A"], out[f"{head}{name}.lora_embedding_B"] = A, B
        else:
            out[f"{head}{name}.lora_A.weight"] = A
            out[f"{head}{name}.lora_B.weight"] = B.view(*B.shape, *([1] * (A.ndim - 2)))
    for saved in description.modules_to_save:
        for key, tensor in tensors.items():
            if key.startswith(saved + "."):
                out[head + key] = tensor
                used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise AdapterFormatError(f"tensor {unused[0]!r} belongs to no layer of the adapter; refusing to drop it")
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def peft_config(description: AdapterDescription, **fields: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the exported adapter: same r, alpha and scaling rule;
    ``fields`` add or override entries (e.g. ``rank_pattern`` for adapter groups)."""
    config = description.config
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "task_type": description.task_type,
        "base_model_name_or_path": description.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(description.modules),
        "fan_in_fan_out": any(layer.kind == "conv1d-transformers" for layer in description.modules.values()),
        "bias": "none",
        "modules_to_save": list(description.modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        **fields,
    }


def write_peft(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write a PEFT LoRA directory from PEFT's tensors (:func:`peft_tensors`) and config
    (:func:`peft_config`): tensors first, then the config, each atomically."""
    directory = Path(directory)
    metadata = {"format": "pt", "exported_by": f"moslora {__version__}: each mixer folded into lora_A (A' = M·A), exactly equal"}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def export_peft(
    directory: str | os.PathLike, description: AdapterDescription, tensors: dict[str, torch.Tensor],
    base_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an adapter as an exactly equal PEFT LoRA directory (``base_weights``: the embedding
    base weights a PEFT directory carried, keyed ``<m>.weight``, written back as PEFT stores them)."""
    out = peft_tensors(description, tensors)
    for key, tensor in (base_weights or {}).items():
        out[f"{PREFIX}{key[: -len('.weight')]}.base_layer.weight"] = tensor.contiguous()
    return write_peft(directory, out, peft_config(description))


def export_peft_mixer(
    directory: str | os.PathLike, description: AdapterDescription, tensors: dict[str, torch.Tensor],
    base_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an adapter as the PEFT route's folder, the mixer kept (A, M and B as they are): what PEFT's
    ``save_pretrained`` writes for the same adapter trained through :mod:`moslora.peft`, so
    ``moslora.peft.PeftModel.from_pretrained`` loads it and stock PEFT refuses it. Without a mixer it is
    PEFT's plain LoRA folder (:func:`export_peft`, which also writes ``base_weights``)."""
    if not description.has_mixer:
        return export_peft(directory, description, tensors, base_weights)
    for name, layer in description.modules.items():
        if layer.kind not in _PEFT_ROUTE_KINDS:
            raise AdapterFormatError(
                f"layer {name!r} is of kind {layer.kind!r}; the PEFT route gives a mixer to linear layers only "
                f"({', '.join(_PEFT_ROUTE_KINDS)}). Export it as plain LoRA (format 'peft'), which folds the mixer exactly"
            )
    out = peft_tensors(description, tensors, keep_mixer=True)
    return write_peft(directory, out, peft_config(description, peft_type=PEFT_ROUTE_TYPE, mixer=description.config.mixer))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type") not in ("LORA", PEFT_ROUTE_TYPE):
        raise AdapterFormatError(f"{path}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; moslora reads LoRA "
                                 "adapters (\"LORA\") and MoSLoRA ones written by PEFT (moslora.peft)")
    if cfg.get("mixer") is not None and cfg["mixer"] not in MIXERS:
        raise AdapterFormatError(f"{path}: mixer {cfg['mixer']!r} is not one of {MIXERS}")
    # Variants whose maths differ from s·B·A (or whose ranks differ per layer) cannot be placed exactly.
    for key, allowed in (("use_dora", (False, None)), ("lora_bias", (False, None)), ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None))):
        if cfg.get(key) not in allowed:
            raise AdapterFormatError(f"{path}: {key}={cfg[key]!r} is not supported (plain LoRA, one r and alpha for all layers)")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"{path}: bias={cfg['bias']!r} trains base biases, which moslora does not load")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)):
            raise AdapterFormatError(f"{path}: field {key!r} must be a number, got {cfg.get(key)!r}")
    return cfg


def _read_tensors(directory: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, weights
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{weights} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    pickles = [directory / name for name in PICKLE_NAMES if (directory / name).is_file()]
    if not pickles:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (nor adapter_model.bin) in adapter directory {str(directory)!r}")
    if not allow_pickle:
        raise AdapterFormatError(
            f"{pickles[0]} is a pickle file, which can run arbitrary code when loaded; if you trust its source, "
            "pass allow_pickle=True (it is then read with torch.load(weights_only=True))"
        )
    try:
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for a bad file
        raise AdapterFormatError(f"{pickles[0]} could not be read as plain tensors ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{pickles[0]} is not a dict of tensors")
    return state, pickles[0]


def _saved_module(key: str, patterns: list[str]) -> str | None:
    """The modules_to_save module that tensor ``key`` (``<module>.<param>``) belongs to, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if matches(".".join(parts[:i]), patterns):
            return ".".join(parts[:i])
    return None


def _kind(module: str, A: torch.Tensor, embeddings: set[str], cfg: dict[str, Any]) -> str:
    if module in embeddings:
        return "embedding"
    if A.ndim > 2:
        return "conv"
    return "conv1d-transformers" if cfg.get("fan_in_fan_out") else "linear"


def _config_says_mixer(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("mixer") or cfg.get("lora_use_mixer") or cfg.get("use_moslora") or cfg.get("use_mixer"))
