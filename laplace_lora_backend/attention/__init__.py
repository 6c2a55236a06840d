"""Attention for forward-mode JVPs: closed-form tangents and the switch to them."""

from laplace_lora_backend.attention.switch import (
    CHECK_NAME,
    CHECK_TOLERANCE,
    attention_implementation,
    eager_attention_of,
    jvp_attention,
    matching_tangent_attention,
)
from laplace_lora_backend.attention.tangent import (
    ATTENTION_NAME,
    NATIVE_ATTENTION_NAME,
    TANGENT_ATTENTIONS,
    TANGENT_BLOCK_BYTES,
    UnsupportedAttentionError,
    native_tangent_attention,
    tangent_attention,
    tangent_directions,
)

__all__ = [
    "ATTENTION_NAME",
    "CHECK_NAME",
    "CHECK_TOLERANCE",
    "NATIVE_ATTENTION_NAME",
    "TANGENT_ATTENTIONS",
    "TANGENT_BLOCK_BYTES",
    "UnsupportedAttentionError",
    "attention_implementation",
    "eager_attention_of",
    "jvp_attention",
    "matching_tangent_attention",
    "native_tangent_attention",
    "tangent_attention",
    "tangent_directions",
]
