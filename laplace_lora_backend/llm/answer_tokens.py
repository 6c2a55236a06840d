"""An LLM as a classifier over answer tokens, read at the last real position.

The paper's classifiers (multiple choice, True/False, sentiment) read the
next-token logits of C answer tokens (" A".." D", " positive"...) at the last
non-padding position. `AnswerTokenClassifier` returns those `(batch, C)`
logits for any HF causal LM, PEFT-wrapped or not, with left or right padding.
`trim_lm_head` shrinks `lm_head` to the C answer rows before LoRA is added, so
that a LoRA on `lm_head` has a `C x C` output factor (as the paper does).
"""

from __future__ import annotations

import inspect
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["AnswerTokenClassifier", "answer_token_ids", "trim_lm_head"]

_TRIM_ATTR = "_laplace_lora_answer_ids"


def answer_token_ids(answers: Sequence[str | int], tokenizer: Any = None) -> list[int]:
    """Token ids of the answers, one token each.

    Parameters
    ----------
    answers : Sequence[str or int]
        Answer strings (e.g. ``[" A", " B"]``, note the leading space for
        BPE vocabularies) or token ids.
    tokenizer : transformers tokenizer, optional
        Needed for strings.

    Returns
    -------
    ids : list[int]

    Raises
    ------
    ValueError
        If an answer is not exactly one token, or answers repeat.
    TypeError
        If strings are given without a tokenizer.
    """
    if len(answers) < 2:
        raise ValueError(f"Need at least 2 answers, got {list(answers)!r}.")
    ids = []
    for a in answers:
        if isinstance(a, int):
            ids.append(a)
            continue
        if tokenizer is None:
            raise TypeError(
                f"Answer {a!r} is a string: pass `tokenizer=` or give token ids."
            )
        toks = tokenizer.encode(a, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(
                f"Answer {a!r} is {len(toks)} tokens {toks}; each answer must be one "
                "token (try a leading space, e.g. ' A', or a shorter word)."
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"Answers map to repeated token ids {ids}.")
    return ids


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trim_lm_head(model: nn.Module, answer_ids: Sequence[int]) -> nn.Module:
    """Replace `lm_head` by its rows for the answer tokens (in place).

    Call it before `peft.get_peft_model`, so that a LoRA on ``lm_head`` acts on
    a `C x hidden` head. Weight tying with the input embeddings is dropped
    (the new head is a copy).

    Parameters
    ----------
    model : transformers causal LM
    answer_ids : Sequence[int]

    Returns
    -------
    model : torch.nn.Module
        The same model, with ``get_output_embeddings()`` of `C` outputs.

    Raises
    ------
    TypeError
        If the output embedding is not a plain `nn.Linear` (e.g. LoRA was
        added already).
    """
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"trim_lm_head needs a plain nn.Linear lm_head, got {type(head).__name__}; "
            "trim before adding LoRA."
        )
    ids = torch.as_tensor(list(answer_ids), device=head.weight.device)
    new = nn.Linear(
        head.in_features,
        len(ids),
        bias=head.bias is not None,
        device=head.weight.device,
        dtype=head.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(head.weight[ids])
        if head.bias is not None:
            new.bias.copy_(head.bias[ids])
    new.weight.requires_grad_(head.weight.requires_grad)
    lm.set_output_embeddings(new)
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.config.tie_word_embeddings = False
    setattr(lm, _TRIM_ATTR, list(int(i) for i in ids))
    return model


def padding_causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(batch, 1, T, T)` mask: causal, padding keys hidden.

    Every query also sees itself, so no row is fully masked (transformers' own
    eager mask can overflow to NaN on padding rows in float64).

    Returns
    -------
    torch.Tensor
        `(batch, 1, T, T)` in `dtype`: 0 where attention is allowed, the
        smallest finite value of `dtype` elsewhere.
    """
    T = mask.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    causal = torch.ones_like(eye).tril()
    allowed = causal & (mask.bool()[:, None, None, :] | eye)
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


class AnswerTokenClassifier(nn.Module):
    """`(batch, C)` logits of answer tokens at the last non-padding position.

    Parameters
    ----------
    model : transformers causal LM, or a `peft.PeftModel` around one
    answers : Sequence[str or int]
        Answer strings (with `tokenizer`) or token ids, one token each.
    tokenizer : transformers tokenizer, optional

    Notes
    -----
    Batches are tensors of `input_ids` or dicts with ``input_ids`` and
    optionally ``attention_mask`` (left or right padding). Position ids are
    computed from the mask (as `generate` does), and only the hidden state of
    the last real token goes through `lm_head`, so no `(batch, T, vocab)`
    logits are ever formed. If `lm_head` was trimmed with `trim_lm_head` to
    these answers, its outputs are the class logits directly.
    """

    # LoRALaplace requires `dict_key_x` in a batch dict when predicting
    reads_dict_key_x = True

    def __init__(
        self,
        model: nn.Module,
        answers: Sequence[str | int],
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.answer_ids = answer_token_ids(answers, tokenizer)
        lm = _causal_lm(model)
        trimmed = getattr(lm, _TRIM_ATTR, None)
        if trimmed is not None and trimmed != self.answer_ids:
            raise ValueError(
                f"lm_head was trimmed to token ids {trimmed}, but the answers are "
                f"{self.answer_ids}; use the same answers in the same order."
            )
        self.trimmed = trimmed is not None
        self.register_buffer(
            "_rows", torch.as_tensor(self.answer_ids), persistent=False
        )
        params = inspect.signature(self._backbone.forward).parameters
        self._accepts_position_ids = "position_ids" in params

    @property
    def _backbone(self) -> nn.Module:
        return _causal_lm(self.model).base_model

    @property
    def n_classes(self) -> int:
        """Number of answers `C`."""
        return len(self.answer_ids)

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`(W, b)` with ``forward(x) = forward_features(x) @ W.T + b``.

        `W` is `(C, hidden)`: the answer rows of `lm_head`. None if `lm_head`
        carries LoRA (then the outputs are not a fixed map of the features).
        With many answers (C > hidden) the GLM predictive differentiates the
        `hidden` features instead of the C outputs.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor or None] or None
            `W` `(C, hidden)` and `b` `(C,)` (None without a bias), or None.
        """
        head = _causal_lm(self.model).get_output_embeddings()
        if type(head) is not nn.Linear:
            return None
        if self.trimmed:
            return head.weight, head.bias
        bias = None if head.bias is None else head.bias[self._rows]
        return head.weight[self._rows], bias

    def forward(self, batch: torch.Tensor | MutableMapping[str, Any]) -> torch.Tensor:
        """Answer logits `(batch, C)`.

        Returns
        -------
        torch.Tensor
            `(batch, C)`.
        """
        h = self.forward_features(batch)
        logits = _causal_lm(self.model).get_output_embeddings()(h)
        return logits if self.trimmed else logits[:, self._rows]

    def forward_features(
        self, batch: torch.Tensor | MutableMapping[str, Any]
    ) -> torch.Tensor:
        """Hidden state of the last real token, `(batch, hidden)`.

        Returns
        -------
        torch.Tensor
            `(batch, hidden)`.
        """
        if isinstance(batch, torch.Tensor):
            ids, mask = batch, None
        else:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        kwargs: dict[str, Any] = {"input_ids": ids}
        T = ids.shape[1]
        if mask is not None and not bool(mask.bool().all()):
            dtype = next(self.model.parameters()).dtype
            kwargs["attention_mask"] = padding_causal_mask(mask, dtype)
            if self._accepts_position_ids:
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
            flipped = mask.bool().flip(-1).long()
            last = T - 1 - flipped.argmax(-1)
        else:
            last = torch.full((ids.shape[0],), T - 1, device=ids.device)
        hidden = self._backbone(**kwargs).last_hidden_state
        return hidden[torch.arange(ids.shape[0], device=ids.device), last]
