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


def __getattr__(name: str):  # lazy: the stage runner pulls in data loading and training
    if name in ("run_stage", "run_lifelong"):
        from loire import lifelong

        return getattr(lifelong, name)
    raise AttributeError(f"module 'loire' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "LoireConfig",
    "LoireForCausalLM",
    "LoireForMaskedLM",
    "LoireForSequenceClassification",
    "LoireModel",
    "LoirePreTrainedModel",
    "preset",
    "run_lifelong",
    "run_stage",
]
