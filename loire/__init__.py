"""LOIRE: lifelong learning for pre-trained language models by growing them."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from loire.config import PRESETS, LoireConfig, preset
from loire.model import (
    LoireForCausalLM,
    LoireForMaskedLM,
    LoireForSequenceClassification,
    LoireModel,
    LoirePreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("loire", LoireConfig, exist_ok=True)
AutoModel.register(LoireConfig, LoireModel, exist_ok=True)
AutoModelForCausalLM.register(LoireConfig, LoireForCausalLM, exist_ok=True)
AutoModelForMaskedLM.register(LoireConfig, LoireForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(LoireConfig, LoireForSequenceClassification, exist_ok=True)

__all__ = [
    "PRESETS",
    "LoireConfig",
    "LoireForCausalLM",
    "LoireForMaskedLM",
    "LoireForSequenceClassification",
    "LoireModel",
    "LoirePreTrainedModel",
    "preset",
]
