"""MoSLoRA inside PEFT: change one import, keep PEFT and TRL.

    from moslora.peft import LoraConfig          # instead of: from peft import LoraConfig
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))

:class:`LoraConfig` is PEFT's ``LoraConfig`` with a ``mixer`` field (the paper's ``"kaiming"`` by default,
``None`` for plain LoRA); PEFT's ``get_peft_model``, ``save_pretrained``, named adapters, mixed batches,
merging and TRL's ``peft_config=`` then run MoSLoRA. A saved folder with a mixer loads with
:meth:`PeftModel.from_pretrained` (and :func:`load_adapter` adds another); stock PEFT refuses it rather
than drop the mixer. With this module imported, PEFT's and transformers' own loaders read such a folder
too (``AutoPeftModelForCausalLM``, ``model.load_adapter``, ``AutoModelForCausalLM.from_pretrained(adapter_dir)``,
``pipeline``); :class:`AutoPeftModelForCausalLM` and its siblings here also check every tensor.
:func:`get_peft_model` and :func:`add_adapter` are PEFT's with every target checked first, so that
what they refuse changes nothing (PEFT's own meet a refused target after wrapping the earlier ones);
:func:`add_weighted_adapter` is PEFT's, exact with mixers; :func:`hotswap_adapter` is PEFT's hot swap with
the mixer swapped along (PEFT's own would zero it).

The mixer plugs in where PEFT plugs its own LoRA variants (see :mod:`moslora.peft.layers`); that
interface is young and changes between PEFT releases, so this module runs with the PEFT versions it is
tested with (:data:`PEFT_VERSIONS`) and refuses others in one line.
"""

from importlib.metadata import PackageNotFoundError as _NotFound
from importlib.metadata import version as _installed

from packaging.specifiers import SpecifierSet as _SpecifierSet

# The PEFT releases tested (make test: the newest; make test-peft-oldest: the oldest). 0.20 is the first
# with the lora_variants registry, through which a PEFT layer that has no mixer refuses a mixer config
# instead of running it as plain LoRA; before 0.19 PEFT does not hand the config to its layers at all.
PEFT_VERSIONS = ">=0.20.0,<0.22"

try:
    _found = f"found peft {_installed('peft')}"
except _NotFound:
    _found = "peft is not installed"
if not _found.startswith("found") or not _SpecifierSet(PEFT_VERSIONS).contains(_installed("peft"), prereleases=True):
    raise ImportError(f"moslora.peft needs peft{PEFT_VERSIONS} (the versions it is tested with); {_found}: pip install 'peft{PEFT_VERSIONS}'")

from moslora.peft.config import LoraConfig  # noqa: E402  (after the version check, which must run first)
from moslora.peft.hotswap import hotswap_adapter  # noqa: E402
from moslora.peft.model import (  # noqa: E402
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftModel,
    add_adapter,
    add_weighted_adapter,
    folded_mixers,
    get_peft_model,
    load_adapter,
)

__all__ = ["PEFT_VERSIONS", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", "LoraConfig", "PeftModel", "add_adapter", "add_weighted_adapter", "folded_mixers",
           "get_peft_model", "hotswap_adapter", "load_adapter"]
