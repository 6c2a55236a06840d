"""Tiny random-init models of the common families, with PEFT's usual setups.

`build(family, task, targets)` returns a float64 PEFT model in eval mode with
non-zero LoRA B weights, and the padding side its inputs need:

- ``task="causal"``: a causal LM read at its answer tokens
  (`AnswerTokenClassifier`, left padding);
- ``task="seq_cls"``: ``task_type="SEQ_CLS"``, whose head PEFT trains in full
  (``modules_to_save``), right padding (absolute positions of GPT-2 / BERT).

`targets` is ``"qv"`` (the query and value projections) or ``"all-linear"``.
"""

from __future__ import annotations

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from torch import nn

from laplace_lora_backend.llm import AnswerTokenClassifier

VOCAB, PAD, CLASSES = 40, 1, 3
ANSWERS = [3, 4, 5]

_SMALL = dict(vocab_size=VOCAB, max_position_embeddings=70, pad_token_id=PAD)
_DECODER = dict(
    **_SMALL,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_ENCODER = dict(
    **_SMALL,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# family: (config, causal LM class, sequence-classification class, q/v names)
FAMILIES = {
    "gpt2": (
        lambda: tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=70,
            pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ),
        tf.GPT2LMHeadModel, tf.GPT2ForSequenceClassification, ["c_attn"],
    ),
    "roberta": (
        lambda: tf.RobertaConfig(**_ENCODER),
        None, tf.RobertaForSequenceClassification, ["query", "value"],
    ),
    "bert": (
        lambda: tf.BertConfig(**_ENCODER),
        None, tf.BertForSequenceClassification, ["query", "value"],
    ),
    "llama": (
        lambda: tf.LlamaConfig(**_DECODER),
        tf.LlamaForCausalLM, tf.LlamaForSequenceClassification, ["q_proj", "v_proj"],
    ),
    "mistral": (
        lambda: tf.MistralConfig(**_DECODER),
        tf.MistralForCausalLM, tf.MistralForSequenceClassification,
        ["q_proj", "v_proj"],
    ),
    "qwen2": (
        lambda: tf.Qwen2Config(**_DECODER),
        tf.Qwen2ForCausalLM, tf.Qwen2ForSequenceClassification, ["q_proj", "v_proj"],
    ),
    "opt": (
        lambda: tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=70, pad_token_id=PAD,
            word_embed_proj_dim=32, dropout=0.0,
        ),
        tf.OPTForCausalLM, tf.OPTForSequenceClassification, ["q_proj", "v_proj"],
    ),
    "qwen2moe": (
        lambda: tf.Qwen2MoeConfig(
            **_DECODER, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=4, num_experts_per_tok=2,
            experts_implementation="eager",  # grouped_mm has no float64
        ),
        tf.Qwen2MoeForCausalLM, tf.Qwen2MoeForSequenceClassification,
        ["q_proj", "v_proj"],
    ),
}  # fmt: skip


def build(family: str, task: str, targets: str, seed: int = 0) -> tuple[nn.Module, str]:
    """A tiny PEFT model of `family` and the padding side of its inputs.

    Returns
    -------
    model : torch.nn.Module
        float64, eval mode; ``model(batch)`` gives `(batch, 3)` logits for
        ``task="causal"``, a HF output with ``.logits`` for ``"seq_cls"``.
    padding_side : str
        ``"left"`` or ``"right"``.
    """
    make_config, causal_cls, seq_cls, qv = FAMILIES[family]
    torch.manual_seed(seed)
    config = make_config()
    config._attn_implementation = "eager"
    if task == "causal":
        base = causal_cls(config)
    else:
        config.num_labels = CLASSES
        base = seq_cls(config)
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules="all-linear" if targets == "all-linear" else qv,
        lora_dropout=0.0,
        init_lora_weights=False,  # non-zero B: every LoRA weight matters
        task_type="SEQ_CLS" if task == "seq_cls" else None,
    )
    peft = get_peft_model(base, lora)
    if task == "causal":
        return AnswerTokenClassifier(peft, ANSWERS).double().eval(), "left"
    return peft.double().eval(), "right"


def sequences(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    """`n` token sequences of different lengths (no special or pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, VOCAB, (3 + i % 4,), generator=g) for i in range(n)]


def padded_batch(seqs: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """One dict batch of `seqs`, padded on `side`, with labels."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    labels = torch.arange(len(seqs)) % CLASSES
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def single_batches(seqs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each sequence alone, without padding: the reference."""
    return [
        {
            "input_ids": s[None],
            "attention_mask": torch.ones(1, len(s), dtype=torch.long),
            "labels": torch.tensor([i % CLASSES]),
        }
        for i, s in enumerate(seqs)
    ]
