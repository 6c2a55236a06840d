"""Text generation with a Laplace posterior over the LoRA weights.

`la.generate(input_ids, max_new_tokens=..., mode=...)` decodes like
transformers' ``generate`` (greedy, or sampling with a temperature; eos and
the attention mask handled) with posterior weight samples:

- ``mode="sample_per_sequence"``: one posterior sample of the LoRA weights per
  row of the batch (Thompson-style: each sequence is a coherent draw of the
  model, so the rows differ where the posterior is uncertain). Each row is
  decoded on its own, without its padding, under its own sample.
- ``mode="model_average"``: at every step the next-token distribution is the
  Bayesian model average ``mean_k softmax(f(x; theta_k))`` over `K` samples;
  each sample keeps its own key-value cache (``past_key_values`` /
  ``cache`` per sample), so a step costs `K` single-token forward passes.

Per-token uncertainty (`laplace_lora_backend.uncertainty`) is returned for
every generated token: the entropy of the distribution it was drawn from
and, for the model average, the mutual information between the token and the
weights. For sequences decoded with ``sample_per_sequence``, score them
afterwards with ``la.next_token_predictive`` for the mutual information.

Weights are copied into the LoRA parameters and the MAP weights are written
back bit for bit afterwards, also if decoding raises
(`LoRAPredictive._restoring_lora_weights`).

Where this lives: generation needs only the call protocol of a transformers
causal LM (``model(input_ids=, attention_mask=, position_ids=, cache=,
use_cache=True)`` returning ``.logits`` and ``.cache``; ``past_key_values``
before transformers 5.x), no import of transformers; it is therefore a core
module below `LoRALaplace`, which mixes it in as ``la.generate`` (the `llm`
package sits above the Laplace classes and could not provide a method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from laplace_lora_backend.curvature.token_loss import checked_mask
from laplace_lora_backend.hf_models import HFLogitsModel
from laplace_lora_backend.next_token import check_token_logits
from laplace_lora_backend.uncertainty import SoftmaxAverage

__all__ = ["GenerationOutput", "LaplaceGeneration"]

MODES = ("sample_per_sequence", "model_average")
CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.x, before


@dataclass
class GenerationOutput:
    """Generated sequences and the uncertainty of every generated token.

    Attributes
    ----------
    sequences : torch.Tensor
        `(batch, prompt + new)`: the prompt (with its padding) and the new
        tokens; `pad_token_id` after a row's eos.
    generated : torch.Tensor
        `(batch, new)` bool: the token was generated (not padding after eos).
    entropy : torch.Tensor
        `(batch, new)` entropy (nats) of the distribution each token was
        drawn from (before the temperature).
    mutual_information : torch.Tensor or None
        `(batch, new)` epistemic part (``model_average``); None for
        ``sample_per_sequence``.
    """

    sequences: torch.Tensor
    generated: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor | None


def _pick(
    probs: torch.Tensor,
    do_sample: bool,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row: argmax, or a draw from ``probs^(1/temperature)``.

    Returns
    -------
    torch.Tensor
        `(batch,)` int64.
    """
    if not do_sample:
        return probs.argmax(-1)
    logp = probs.clamp_min(1e-300).log() / temperature
    tempered = (logp - logp.amax(-1, keepdim=True)).exp()
    return torch.multinomial(tempered, 1, generator=generator).squeeze(-1)


def _lm_step(
    lm: Any, ids: torch.Tensor, mask: torch.Tensor, cache: tuple[str, Any] | None
) -> tuple[torch.Tensor, tuple[str, Any]]:
    """Run the new tokens `ids` after `cache`; next-token logits and cache.

    The cache is passed back under the name the model returned it with:
    ``cache`` (transformers >= 5.x) or ``past_key_values``.

    Returns
    -------
    logits : torch.Tensor
        `(batch, V)` at the last position.
    cache : tuple[str, Any]
        The keyword and the model's key-value cache.

    Raises
    ------
    TypeError
        If the model does not follow transformers' causal-LM call protocol.
    """
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
    past = {} if cache is None else {cache[0]: cache[1]}
    out = lm(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **past
    )
    fields = getattr(out, "__dataclass_fields__", {})
    name = next((n for n in CACHE_NAMES if n in fields), None)
    if name is None or not hasattr(out, "logits"):
        raise TypeError(
            "generate needs a transformers causal LM (PEFT-wrapped or not) that "
            "returns .logits and its key-value cache (.cache or .past_key_values); "
            f"got {type(out).__name__} from {type(lm).__name__}."
        )
    return check_token_logits(out.logits)[:, -1], (name, getattr(out, name))


class LaplaceGeneration:
    """`generate`: a mixin of `LoRALaplace` (see the module docstring).

    Uses the host's `model`, `sample`, `_restoring_lora_weights`,
    `_set_lora_weights`, `_check_prediction_input` and `_device`.
    """

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        mode: str = "model_average",
        n_samples: int = 8,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        """Decode with posterior weight samples (transformers-style call).

        Parameters
        ----------
        input_ids : torch.Tensor
            `(batch, prompt)` token ids (left padding for batched prompts).
        max_new_tokens : int, default=20
        mode : {'model_average', 'sample_per_sequence'}
            See the module docstring.
        n_samples : int, default=8
            `K` for ``model_average`` (``sample_per_sequence`` draws one per
            row).
        attention_mask : torch.Tensor, optional
            `(batch, prompt)`, 1 for real tokens; default all ones.
        do_sample : bool, default=False
            Sample the next token (else greedy).
        temperature : float, default=1.0
            With `do_sample`: draw from ``p^(1/temperature)``, normalised.
        eos_token_id : int, optional
            A row stops after it; later positions get `pad_token_id`.
        pad_token_id : int, default=0
        generator : torch.Generator, optional
            For the weight samples and the token draws.

        Returns
        -------
        GenerationOutput

        Raises
        ------
        TypeError
            If the posterior's model is not a transformers causal LM.
        """  # noqa: DOC502 (ValueError: raised by _check_generate)
        input_ids, attention_mask = self._check_generate(
            input_ids, attention_mask, max_new_tokens, mode, n_samples, temperature
        )
        if not isinstance(self.model, HFLogitsModel):
            raise TypeError(
                "generate needs a transformers causal LM (PEFT-wrapped or not) "
                "passed to Laplace as is; this posterior's model is a "
                f"{type(self.model).__name__}."
            )
        lm = self.model.model
        pick = lambda p: _pick(p, do_sample, temperature, generator)  # noqa: E731
        stop = (eos_token_id, pad_token_id)
        with self._restoring_lora_weights(), torch.no_grad():
            if mode == "model_average":
                samples = self.sample(int(n_samples), generator)
                return self._decode(
                    lm, samples, input_ids, attention_mask, max_new_tokens, pick, stop
                )
            samples = self.sample(input_ids.shape[0], generator)
            rows = []
            for b in range(input_ids.shape[0]):
                real = attention_mask[b].bool()
                rows.append(
                    self._decode(
                        lm,
                        samples[b : b + 1],
                        input_ids[b : b + 1, real],
                        attention_mask[b : b + 1, real],
                        max_new_tokens,
                        pick,
                        stop,
                    )
                )
        return _stack_rows(rows, input_ids, pad_token_id)

    def _decode(
        self,
        lm: Any,
        samples: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        pick: Any,
        stop: tuple[int | None, int],
    ) -> GenerationOutput:
        """Decode a batch under the model average of `samples` `(K, P)`.

        Returns
        -------
        GenerationOutput
            The prompt `ids` and up to `max_new_tokens` new tokens per row
            (fewer if every row has stopped); mutual information when `K > 1`.
        """
        eos, pad = stop
        caches: list[tuple[str, Any] | None] = [None] * samples.shape[0]
        new, out, ent, mi = ids, [], [], []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            average = SoftmaxAverage()
            for k, sample in enumerate(samples):
                self._set_lora_weights(sample)
                logits, caches[k] = _lm_step(lm, new, mask, caches[k])
                average.add(logits)
            probs, total, _, mutual = average.result()
            token = torch.where(done, pad, pick(probs))
            out.append(token)
            ent.append(total)
            mi.append(mutual)
            done = done | (token == eos) if eos is not None else done
            new = token[:, None]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if bool(done.all()):
                break
        tokens = torch.stack(out, 1)
        generated = torch.ones_like(tokens, dtype=torch.bool)
        if eos is not None:  # after a row's eos: padding
            hit = (tokens == eos).long().cumsum(1)
            generated = (hit - (tokens == eos).long()) == 0
        return GenerationOutput(
            torch.cat([ids, tokens], 1),
            generated,
            torch.stack(ent, 1) * generated,
            torch.stack(mi, 1) * generated if samples.shape[0] > 1 else None,
        )

    def _check_generate(
        self,
        input_ids: Any,
        attention_mask: Any,
        max_new_tokens: int,
        mode: str,
        n_samples: int,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the arguments of `generate`.

        Returns
        -------
        input_ids, attention_mask : torch.Tensor
            `(batch, prompt)` on the model's device (the mask all ones if
            None was given).

        Raises
        ------
        ValueError
            For bad shapes, modes, counts or temperatures.
        TypeError
            If `input_ids` is not an integer tensor.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            raise TypeError(
                "input_ids must be an integer tensor (batch, prompt), e.g. "
                "tokenizer(texts, return_tensors='pt', padding=True).input_ids."
            )
        attention_mask = checked_mask(input_ids, attention_mask)
        if input_ids.shape[1] == 0:
            raise ValueError("generate needs a non-empty prompt, got 0 tokens.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if int(max_new_tokens) < 1 or int(n_samples) < 1:
            raise ValueError(
                f"max_new_tokens and n_samples must be >= 1, got {max_new_tokens} "
                f"and {n_samples}."
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self._check_prediction_input(input_ids)
        return input_ids.to(self._device), attention_mask.to(self._device)


def _stack_rows(
    rows: list[GenerationOutput], input_ids: torch.Tensor, pad: int
) -> GenerationOutput:
    """One `GenerationOutput` from rows decoded one by one.

    Returns
    -------
    GenerationOutput
        New tokens padded with `pad` to the longest row; the prompts as given
        (with their padding).
    """
    prompts = [r.sequences.shape[1] - r.generated.shape[1] for r in rows]
    n = max(r.generated.shape[1] for r in rows)
    tokens = input_ids.new_full((len(rows), n), pad)
    generated = torch.zeros(len(rows), n, dtype=torch.bool, device=input_ids.device)
    ent = torch.zeros(len(rows), n, dtype=rows[0].entropy.dtype)
    for b, (r, p) in enumerate(zip(rows, prompts, strict=True)):
        m = r.generated.shape[1]
        tokens[b, :m] = r.sequences[0, p:]
        generated[b, :m] = r.generated[0]
        ent[b, :m] = r.entropy[0]
    return GenerationOutput(
        torch.cat([input_ids, tokens], 1), generated, ent.to(tokens.device), None
    )
