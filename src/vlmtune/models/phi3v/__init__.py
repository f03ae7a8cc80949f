"""Phi-3-Vision / Phi-3.5-Vision, native to transformers 5 (no remote code).

Importing this package registers the `phi3_v` model type with transformers' auto classes, so
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(directory)` work for official and vlmtune checkpoints.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import Phi3VConfig
from .image_processing import Phi3VImageProcessor
from .modeling import Phi3VForCausalLM, Phi3VModel
from .processing import Phi3VProcessor

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VModel", "Phi3VProcessor"]
