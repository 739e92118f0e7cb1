"""Loading and combining PEFT-route adapters: PEFT's own machinery, and the checks it leaves out.

- Loading (:meth:`PeftModel.from_pretrained`, :func:`load_adapter`) reads the config with
  :class:`moslora.peft.LoraConfig` (stock PEFT refuses a MoSLoRA folder's ``peft_type``), lets PEFT load
  the weights, and makes what PEFT only warns about, or says nothing about, an error naming the file and
  the tensor: a mixer the config promises and the file lacks (or the reverse), a LoRA tensor of the
  adapter missing from the file, a tensor of the file that nothing loaded.
- :func:`add_weighted_adapter` is PEFT's ``add_weighted_adapter`` made exact with mixers: PEFT combines
  the A and B it reads, so while it runs every mixer is folded into its A (:func:`folded_mixers`), and
  the result is PEFT's own combination of the equivalent plain LoRA adapters.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

import peft
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors import safe_open
from torch import nn

from moslora.core.layers import fold_mixer
from moslora.peft.config import LoraConfig
from moslora.peft.dispatch import check_targets
from moslora.peft.layers import MixerLayer

_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token")
_WEIGHTS_NAME = "adapter_model.safetensors"


class _CheckedLoading:
    """What moslora's PEFT model classes add to PEFT's: a :meth:`from_pretrained` that reads MoSLoRA
    folders and checks that it loaded every tensor of the adapter, mixers included."""

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: peft.PeftConfig | None = None, **kwargs: Any) -> peft.PeftModel:
        """PEFT's ``PeftModel.from_pretrained`` (same arguments) for a MoSLoRA or plain LoRA folder. The model
        it returns is PEFT's own class for the config's task type."""
        config = config if config is not None else read_config(model_id, **kwargs)
        saved = saved_keys(model_id, **kwargs)
        check_file(config, saved, model_id)
        loaded = super().from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs)
        try:
            check_loaded(loaded, adapter_name, saved, model_id)
        except ValueError:
            loaded.unload()  # hand the user's model back without the adapter that did not load whole
            raise
        return loaded


class PeftModel(_CheckedLoading, peft.PeftModel):
    """``peft.PeftModel`` whose :meth:`from_pretrained` also reads MoSLoRA folders and checks every tensor."""


def _auto(name: str, peft_auto: type, peft_model: type) -> type:
    # PEFT's AutoPeftModel* load the base model named in the adapter's config and hand it to their
    # _target_peft_class, which they check by its name against the config's task type.
    checked = type(peft_model.__name__, (_CheckedLoading, peft_model), {"__module__": __name__, "__doc__": peft_model.__doc__})
    doc = (f"``peft.{name}`` for MoSLoRA and plain LoRA folders: the base model the adapter names, then the "
           "adapter, every tensor checked (as :meth:`PeftModel.from_pretrained`).")
    return type(name, (peft_auto,), {"__module__": __name__, "__doc__": doc, "_target_peft_class": checked})


AutoPeftModel = _auto("AutoPeftModel", peft.AutoPeftModel, peft.PeftModel)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", peft.AutoPeftModelForCausalLM, peft.PeftModelForCausalLM)
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", peft.AutoPeftModelForSeq2SeqLM, peft.PeftModelForSeq2SeqLM)
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification", peft.AutoPeftModelForSequenceClassification,
                                               peft.PeftModelForSequenceClassification)
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", peft.AutoPeftModelForTokenClassification,
                                            peft.PeftModelForTokenClassification)
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", peft.AutoPeftModelForQuestionAnswering,
                                          peft.PeftModelForQuestionAnswering)
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", peft.AutoPeftModelForFeatureExtraction,
                                          peft.PeftModelForFeatureExtraction)



def get_peft_model(model: nn.Module, peft_config: peft.PeftConfig, adapter_name: str = "default", **kwargs: Any) -> peft.PeftModel:
    """PEFT's ``get_peft_model`` (same arguments), with every target checked before PEFT wraps any
    (:func:`moslora.peft.dispatch.check_targets`): a refusal leaves ``model`` as it was, where PEFT's own
    would have wrapped the targets that come before the refused one."""
    check_targets(model, peft_config, adapter_name)
    return peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)


def add_adapter(model: peft.PeftModel, adapter_name: str, peft_config: peft.PeftConfig, low_cpu_mem_usage: bool = False) -> peft.PeftModel:
    """PEFT's ``model.add_adapter`` (same arguments), with every target checked before anything changes
    (:func:`moslora.peft.dispatch.check_targets`), notably a mixer config on layers stock PEFT built
    (bitsandbytes' among them), which PEFT's own would run without the mixer. Returns ``model``."""
    if adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter {adapter_name!r}; choose another name, or delete_adapter it first")
    check_targets(model, peft_config, adapter_name)
    model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    return model


def load_adapter(model: peft.PeftModel, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                 **kwargs: Any) -> peft.PeftModel:
    """Add the adapter saved in ``model_id`` (MoSLoRA or plain LoRA) to ``model`` as ``adapter_name``:
    PEFT's ``model.load_adapter`` (same arguments), with the config read by :class:`LoraConfig` and every
    tensor checked. On error the model is left as it was. Returns ``model``."""
    if adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter {adapter_name!r}; choose another name, or delete_adapter it first")
    config = read_config(model_id, **kwargs)
    saved = saved_keys(model_id, **kwargs)
    check_file(config, saved, model_id)
    config.inference_mode = not is_trainable
    add_adapter(model, adapter_name, config, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False))
    try:
        model.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        check_loaded(model, adapter_name, saved, model_id)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    if is_trainable:
        model.set_requires_grad(adapter_name)
    return model


def add_weighted_adapter(model: peft.PeftModel, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", **kwargs: Any) -> peft.PeftModel:
    """PEFT's ``model.add_weighted_adapter`` (same arguments, every ``combination_type``), exact with mixers.

    The new adapter is PEFT's own combination of the plain LoRA adapters the sources equal (A replaced
    by M·A), and has no mixer: for ``cat`` that is the block-diagonal mixer folded into the stacked A's,
    for ``svd`` the SVD of Σ wᵢ·ΔWᵢ with ΔWᵢ = sᵢ·Bᵢ·Mᵢ·Aᵢ, for the linear family the A's it combines are
    the folded ones. PEFT's own call on a model with mixers is refused
    (:meth:`moslora.peft.LoraConfig.__post_init__`); so is a name the model already has, which PEFT would
    silently skip. Returns ``model``."""
    if adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter {adapter_name!r}; choose another name, or delete_adapter it first")
    with folded_mixers(model):
        model.add_weighted_adapter(adapters, weights, adapter_name, combination_type=combination_type, **kwargs)
    return model


@contextlib.contextmanager
def folded_mixers(model: nn.Module) -> Iterator[None]:
    """Inside, every MoSLoRA adapter of ``model`` is the plain LoRA adapter it equals: A holds M·A and
    there is no mixer (layers and configs alike, so a config copied inside is a plain one). On the way
    out each A, M and config is put back as it was, bit for bit (the same tensors and parameters)."""
    stash = []
    configs = [c for c in getattr(model, "peft_config", {}).values() if isinstance(c, LoraConfig) and c.mixer is not None]
    mixers = {id(c): c.mixer for c in configs}
    try:
        for layer in _mixer_layers(model):
            for name in list(layer.lora_M):
                A = layer.lora_A[name].weight
                stash.append((layer, name, A.data, layer.lora_M[name], layer.lora_variant.pop(name)))
                A.data = fold_mixer(A.data, layer.lora_M[name].weight.data).to(A.dtype)
                del layer.lora_M[name]
        for c in configs:
            c.mixer = None
        yield
    finally:
        for c in configs:
            c.mixer = mixers[id(c)]
        for layer, name, A, mixer, variant in stash:
            layer.lora_A[name].weight.data = A
            layer.lora_M[name] = mixer
            layer.lora_variant[name] = variant


def read_config(model_id: str | os.PathLike, **kwargs: Any) -> LoraConfig:
    """The adapter config saved in ``model_id`` (a folder or a Hub id; PEFT's hub arguments apply)."""
    try:
        return LoraConfig.from_pretrained(str(model_id), **_hub_kwargs(kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{model_id}: {e}") from e


def saved_keys(model_id: str | os.PathLike, **kwargs: Any) -> set[str]:
    """The tensor names in ``model_id``'s weights file, as PEFT reads them (``key_mapping`` applied)."""
    hub = _hub_kwargs(kwargs)
    local = os.path.join(str(model_id), hub.get("subfolder") or "", _WEIGHTS_NAME)
    if kwargs.get("key_mapping") is None and os.path.isfile(local):
        with safe_open(local, framework="pt") as f:  # the names only; PEFT reads the tensors
            return set(f.keys())
    return set(load_peft_weights(str(model_id), device="cpu", key_mapping=kwargs.get("key_mapping"), **hub))


def check_file(config: peft.PeftConfig, saved: Iterable[str], model_id: str | os.PathLike) -> None:
    """Before anything is loaded: the file has a mixer for every adapted layer if the config has one,
    and none otherwise (a stock ``LoraConfig`` counts as none)."""
    layers = {key.rpartition(".lora_A")[0] for key in saved if ".lora_A." in key}
    mixed = {key.rpartition(".lora_M")[0] for key in saved if ".lora_M." in key}
    if getattr(config, "mixer", None) is None:
        if mixed:
            raise ValueError(f"{model_id}: layer {sorted(mixed)[0]!r} has a mixer (lora_M) but the config has none; "
                             "loading it as plain LoRA would drop the mixer")
    elif layers != mixed:
        layer = sorted(layers ^ mixed)[0]
        raise ValueError(f"{model_id}: the config has mixer={config.mixer!r} but layer {layer!r} has "
                         f"{'no mixer (lora_M)' if layer in layers else 'a mixer and no lora_A'}")


def check_loaded(model: nn.Module, adapter_name: str, saved: Iterable[str], model_id: str | os.PathLike) -> None:
    """After loading: every LoRA tensor of adapter ``adapter_name`` came from the file, and every LoRA
    tensor of the file went into the model (PEFT warns about the first and ignores the second)."""
    expected = {key for key in get_peft_model_state_dict(model, adapter_name=adapter_name) if ".lora_" in key}
    saved = {key for key in saved if ".lora_" in key}
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing:
        raise ValueError(f"{model_id}: tensor {missing[0]!r} of adapter {adapter_name!r} is not in the file")
    if unexpected:
        raise ValueError(f"{model_id}: tensor {unexpected[0]!r} of the file belongs to no layer of adapter {adapter_name!r}; "
                         "refusing to drop it")


def _mixer_layers(model: nn.Module) -> Iterator[MixerLayer]:
    return (m for m in model.modules() if isinstance(m, MixerLayer))


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
