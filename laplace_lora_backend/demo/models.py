"""The demo's classifiers: SmolLM2 or a tiny random Llama, LoRA on answer tokens."""

from __future__ import annotations

import torch

from laplace_lora_backend.demo.config import DemoConfig
from laplace_lora_backend.demo.data import TextDataset
from laplace_lora_backend.demo.smollm2 import load_smollm2
from laplace_lora_backend.llm.answer_tokens import (
    AnswerTokenClassifier,
    answer_token_ids,
    trim_lm_head,
)

__all__ = ["build_model", "tiny_model_and_tokenizer"]


def tiny_model_and_tokenizer(data: TextDataset, seed: int):
    """Random-init tiny Llama and a word-level tokenizer of the data (CI).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        2 layers, hidden size 64, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerFast
        Over the answers, the prompt's words and the 400 most common words of
        the training texts; pads on the left.
    """
    from collections import Counter

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Counter(
        w for text, _ in data.train for w in text.lower().split()[:64]
    ).most_common(400)
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in [a.strip() for a in data.answers] + [w for w, _ in words]:
        vocab.setdefault(w, len(vocab))
    for w in data.prompt("").lower().split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval(), tokenizer


def build_model(cfg: DemoConfig, data: TextDataset, seed: int):
    """LoRA classifier over the data set's answer tokens, and its tokenizer.

    Returns
    -------
    model : AnswerTokenClassifier
        The PEFT LoRA model (lm_head trimmed to the answer tokens), in eval
        mode.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    ValueError
        If ``cfg.model`` is neither ``"smollm2"`` nor ``"tiny"``.
    """
    from peft import LoraConfig, get_peft_model

    if cfg.model == "tiny":
        lm, tokenizer = tiny_model_and_tokenizer(data, seed)
        answers = [a.strip() for a in data.answers]
    elif cfg.model == "smollm2":
        lm, tokenizer = load_smollm2()
        answers = data.answers
    else:
        raise ValueError(f"Unknown model {cfg.model!r}; use 'smollm2' or 'tiny'.")
    ids = answer_token_ids(answers, tokenizer)
    trim_lm_head(lm, ids)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
    )
    model = AnswerTokenClassifier(get_peft_model(lm, lora), ids)
    return model.eval(), tokenizer
