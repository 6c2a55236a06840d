"""Curvature backends for the LoRA weights of PEFT models."""

from laplace_lora_backend.curvature.discovery import LoRAWeight, find_lora_weights
from laplace_lora_backend.curvature.lora import LoRAEF, LoRAGGN, LoRAInterface
from laplace_lora_backend.curvature.tokens import KFACApprox

__all__ = [
    "KFACApprox",
    "LoRAEF",
    "LoRAGGN",
    "LoRAInterface",
    "LoRAWeight",
    "find_lora_weights",
]
