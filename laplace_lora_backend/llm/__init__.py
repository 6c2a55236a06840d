"""Transformers-facing helpers: answer-token classifiers and HF adapters."""

from laplace_lora_backend.hf_models import HFLogitsModel, as_logits_model
from laplace_lora_backend.llm.answer_tokens import (
    AnswerTokenClassifier,
    answer_token_ids,
    trim_lm_head,
)

__all__ = [
    "AnswerTokenClassifier",
    "HFLogitsModel",
    "answer_token_ids",
    "as_logits_model",
    "trim_lm_head",
]
