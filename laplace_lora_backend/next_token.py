r"""Bayesian next-token predictive of a causal LM over its whole vocabulary.

For a model returning `(batch, tokens, V)` logits (a transformers causal LM,
PEFT-wrapped, as `HFLogitsModel` calls it) the predictive of the next token at
EVERY position is a model average of softmaxes over `K` posterior samples:

- ``pred_type="nn"`` (sampling): ``mean_k softmax(f(x; theta_k))`` with LoRA
  weights ``theta_k ~ N(theta*, Sigma)``, copied in and restored bit for bit
  (`LoRAPredictive._sampled_outputs`): `K` forward passes.
- ``pred_type="glm"`` (linearised): the GLM predictive
  ``E[softmax(f_lin)]``, ``f_lin = f(x; theta*) + J (theta_k - theta*)``,
  where `J` is the Jacobian of all `tokens x V` logits w.r.t. the LoRA
  weights. Its exact form is a Gaussian over the logits with covariance
  ``J Sigma J^T`` of side `tokens * V` (``49152 * T`` for SmolLM2): neither
  it nor `J` (one backward pass per output) can be formed. Instead every
  ``J delta_k``, ``delta_k = theta_k - theta*``, is a forward-mode
  Jacobian-vector product (`torch.func.jvp`) along a posterior draw: an
  exact sample of ``N(0, J Sigma J^T)``, jointly over all positions and the
  whole vocabulary (``(1/K) sum_k (J delta_k)(J delta_k)^T`` is an unbiased
  rank-`K` Monte-Carlo factor of ``J Sigma J^T``). The softmax average over
  the `K` samples is then the usual MC estimate of the GLM predictive. No
  probit / diagonal shortcut is used: those need the `tokens * V`
  variances, i.e. `tokens * V` backward passes.

  Cost. A transformers causal LM whose logits are its linear head applied
  to the decoder's last hidden states `h` (`decoder_and_head`, checked
  once per Laplace object) is linearised in the decoder only: one
  vectorised JVP (`torch.func.vmap`) gives `h` and its `K` tangents
  ``dh_k = J_h delta_k``, `(K, batch, tokens, H)`, sharing one primal
  pass; then ``f_lin_k = head(h + dh_k)`` exactly (the head is affine),
  one head product per sample: ``K + 1`` decoder passes and `K` head
  products, plus attention's tangents: by `attention.tangent_attention`
  (closed form, query rows by blocks: memory linear in the length) where
  it reproduces the model's eager attention on the first batch
  (`jvp_attention`; Llama, Mistral, Qwen, GPT-2..., loaded with SDPA or
  not), else by AD through the eager attention, whose `(K, heads, T, T)`
  score tangents the default `chunk_size` bounds
  (`DecoderHead.directions_per_jvp`). Costs in forward passes:
  `benchmarks/bench_generation_cost.py`.
  Otherwise (a LoRA or post-processed head, a non-HF model) the whole
  model is linearised, `chunk_size` directions per JVP: about ``3 K``
  forward passes with one direction at a time.
- ``pred_type="map"``: the MAP softmax (one pass; zero mutual information).

Memory: the running average (`SoftmaxAverage`) holds the average and the
current sample's logits, `(batch, tokens, V)` each, whatever `K` (each
sample's softmax and entropy are computed slice by slice of rows); no
Jacobian and no covariance of the logits is ever formed. The posterior
samples themselves, `(K, P)`, come from laplace-torch's `sample`.

Per-token uncertainty (`laplace_lora_backend.uncertainty`): the predictive
entropy, its aleatoric part ``mean_k H[softmax(f_k)]`` and the mutual
information (epistemic) at every position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from laplace_lora_backend.attention import (
    TANGENT_ATTENTIONS,
    attention_implementation,
    jvp_attention,
    tangent_directions,
)
from laplace_lora_backend.curvature.token_loss import target_mask
from laplace_lora_backend.hf_models import (
    DecoderHead,
    decoder_and_head,
    pretrained_model,
)
from laplace_lora_backend.uncertainty import SoftmaxAverage, entropy

__all__ = ["NextTokenPredictive", "TokenPredictive", "check_token_logits"]

PRED_TYPES = ("nn", "glm", "map")


@dataclass
class TokenPredictive:
    """Next-token predictive at every position, with its uncertainty.

    Attributes
    ----------
    probs : torch.Tensor
        `(batch, tokens, V)`: the distribution of the token at ``t + 1``.
    entropy : torch.Tensor
        `(batch, tokens)` predictive entropy (nats).
    expected_entropy : torch.Tensor
        `(batch, tokens)` aleatoric part.
    mutual_information : torch.Tensor
        `(batch, tokens)` epistemic part (0 for the MAP).
    """

    probs: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor

    def target_log_probs(self, labels: torch.Tensor) -> torch.Tensor:
        """Log predictive probability of each target token.

        Parameters
        ----------
        labels : torch.Tensor
            `(batch, tokens)` next-token ids aligned with the positions
            (`next_token_labels`), -100 where none.

        Returns
        -------
        torch.Tensor
            `(batch, tokens)`; 0 where there is no target.

        Raises
        ------
        ValueError
            If `labels` is not `(batch, tokens)`.
        """
        if labels.shape != self.probs.shape[:2]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must be (batch, tokens) = "
                f"{tuple(self.probs.shape[:2])}: next_token_labels(input_ids, mask)."
            )
        has = target_mask(labels)
        idx = torch.where(has, labels, 0).long().unsqueeze(-1)
        p = self.probs.gather(-1, idx.to(self.probs.device)).squeeze(-1)
        return torch.where(has.to(p.device), p.clamp_min(1e-300).log(), 0.0)


def check_token_logits(f: Any) -> torch.Tensor:
    """The model's output, which must be `(batch, tokens, V)` logits.

    Returns
    -------
    torch.Tensor

    Raises
    ------
    ValueError
        For any other output.
    """
    if not isinstance(f, torch.Tensor) or f.ndim != 3:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(
            f"The next-token predictive needs a causal LM returning (batch, tokens, "
            f"vocab) logits, got {shape}. Pass the PEFT causal LM itself to Laplace "
            "(not an AnswerTokenClassifier), or use la(x) for classification."
        )
    return f


@torch.no_grad()
def _head_logits(split: DecoderHead, h: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """``head(h + dh)``: the linearised logits of one hidden-state tangent.

    Returns
    -------
    torch.Tensor
        `(batch, tokens, V)`.
    """
    return split.head(h + dh)


class NextTokenPredictive:
    """`next_token_predictive`: a mixin of `LoRALaplace`.

    Uses the host's `model`, `params`, `lora_weights`, `mean`, `sample`,
    `_check_prediction_input`, `_sampled_outputs` and `_device`.
    """

    def next_token_predictive(
        self,
        x: Any,
        pred_type: str = "nn",
        n_samples: int = 10,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ) -> TokenPredictive:
        """The Bayesian next-token predictive at every position of a batch.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            `(batch, tokens)` input ids, or a dict batch (``input_ids``,
            ``attention_mask``; labels are ignored).
        pred_type : {'nn', 'glm', 'map'}, default='nn'
            Weight sampling, the linearised (GLM) predictive by forward-mode
            JVPs, or the MAP (see the module docstring).
        n_samples : int, default=10
            Posterior samples `K`.
        generator : torch.Generator, optional
            For the posterior samples.
        chunk_size : int, optional
            ``"glm"``: directions per vectorised JVP. Default: where the
            model splits into decoder and linear head, all `K` (through
            `tangent_attention`), or, through eager attention, fewer so that
            the tangents of the attention scores stay under
            `TANGENT_SCORES_BYTES` (`DecoderHead.directions_per_jvp`); else 1
            (one tangent logit tensor); see the module docstring for the
            costs.

        Returns
        -------
        TokenPredictive

        Raises
        ------
        ValueError
            For an unknown `pred_type`, `n_samples < 1`, or a model that
            does not return `(batch, tokens, V)` logits.
        """
        if pred_type not in PRED_TYPES:
            raise ValueError(
                f"pred_type must be one of {PRED_TYPES} (sampling, linearised, MAP), "
                f"got {pred_type!r}."
            )
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        self._check_prediction_input(x)
        x = x.to(self._device) if isinstance(x, torch.Tensor) else x
        if pred_type == "map":
            with torch.no_grad():
                f = check_token_logits(self.model(x))
                probs = f.to(torch.promote_types(f.dtype, torch.float32)).softmax(-1)
            total = entropy(probs)
            return TokenPredictive(probs, total, total.clone(), torch.zeros_like(total))
        if pred_type == "nn":
            samples = self._sampled_outputs(x, int(n_samples), generator)
        else:
            samples = self.linearised_logits(x, int(n_samples), generator, chunk_size)
        average = SoftmaxAverage()
        for f in samples:
            average.add(check_token_logits(f))
            del f  # freed before the next sample's forward pass
        probs, total, expected, mutual = average.result()
        return TokenPredictive(probs, total, expected, mutual)

    def linearised_logits(
        self,
        x: Any,
        n_samples: int,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Samples of the linearised logits ``f(x) + J (theta_k - theta*)``.

        Forward-mode JVPs along the posterior draws, `chunk_size` at a time,
        through the decoder only where the model splits into decoder and
        linear head (`decoder_and_head`), else through the whole model; the
        model is not modified.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            A batch on the model's device.
        n_samples : int
        generator : torch.Generator, optional
        chunk_size : int, optional
            Directions per JVP; default: as `next_token_predictive`.

        Yields
        ------
        torch.Tensor
            The model's output shape, e.g. `(batch, tokens, V)`.
        """
        deltas = self.sample(n_samples, generator) - self.mean
        split = self.decoder_head_split(x)
        if split is None:
            for chunk in deltas.split(max(1, int(chunk_size or 1))):
                f, jvps = self.logits_and_jvp(x, chunk)
                for jvp in jvps:
                    yield f + jvp
            return
        per_jvp = chunk_size or (
            n_samples
            if self.jvp_attention(x) in TANGENT_ATTENTIONS
            else split.directions_per_jvp(x, n_samples)
        )
        for chunk in deltas.split(max(1, int(per_jvp))):
            h, dhs = self.logits_and_jvp(x, chunk, split)
            for dh in dhs:
                # no name holds the logits while the generator is suspended
                yield _head_logits(split, h, dh)

    def decoder_head_split(self, x: Any) -> DecoderHead | None:
        """The model's decoder/linear-head split, checked on the first batch.

        None where it does not hold or where a LoRA weight lies outside the
        decoder (then the whole model is linearised).

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            A batch on the model's device (for the check).

        Returns
        -------
        DecoderHead or None
        """
        if not hasattr(self, "_decoder_head"):
            split = decoder_and_head(self.model, x)
            inside = split is not None and {
                id(p) for p in split.decoder.parameters()
            }.issuperset(id(p) for p in self.params)
            self._decoder_head = split if inside else None
        return self._decoder_head

    def jvp_attention(self, x: Any) -> str | None:
        """The attention JVPs go through, chosen on the first batch.

        `attention.jvp_attention`, checked on the decoder (with the
        decoder/head split) or the whole model.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            A batch on the model's device (for the check).

        Returns
        -------
        str or None
        """
        if not hasattr(self, "_jvp_attention"):
            split = self.decoder_head_split(x)
            call = self.model if split is None else split.hidden_states
            base = pretrained_model(self.model)
            self._jvp_attention = jvp_attention(base, lambda: call(x))
        return self._jvp_attention

    def logits_and_jvp(
        self,
        x: Any,
        directions: torch.Tensor,
        split: DecoderHead | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and their derivatives along `directions` in the LoRA weights.

        One direction: one JVP (`torch.func.jvp`), about two forward passes.
        `c` directions: one JVP vectorised over them (`torch.func.vmap`):
        the primal is computed once, so `K` directions in one chunk cost
        about ``K + 1`` forward passes, at `c` times the memory of the
        tangents.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            A batch on the model's device.
        directions : torch.Tensor
            `(P,)` or `(c, P)` directions in the LoRA weights (the order of
            `params`).
        split : DecoderHead, optional
            Differentiate the decoder's last hidden states instead of the
            model's outputs (every LoRA weight must lie in the decoder).

        Returns
        -------
        f : torch.Tensor
            The outputs at the MAP: e.g. `(batch, tokens, V)` logits, or
            `(batch, tokens, H)` hidden states with `split`.
        jvp : torch.Tensor
            ``J direction``: the shape of `f`, or `(c, *f.shape)`.
        """
        if split is None:
            module, args, kwargs = self.model, (x,), {}
        else:
            module, args, kwargs = split.decoder, (), split.decoder_kwargs(x)
        where = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        names = [where[id(p)] for p in self.params]
        chunks = directions.split([p.numel() for p in self.params], dim=-1)
        tangents = tuple(
            c.reshape(*directions.shape[:-1], *p.shape).to(p.device, p.dtype)
            for c, p in zip(chunks, self.params, strict=True)
        )
        primals = tuple(p.detach() for p in self.params)

        def forward(*weights: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(
                module, dict(zip(names, weights, strict=True)), args, kwargs
            )
            return out if split is None else out.last_hidden_state

        def jvp(*t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.jvp(forward, primals, t)

        attention = self.jvp_attention(x)
        with ExitStack() as switched, torch.no_grad():
            if attention is not None:
                base = pretrained_model(self.model)
                switched.enter_context(attention_implementation(base, attention))
            if directions.ndim == 1:
                return jvp(*tangents)
            switched.enter_context(tangent_directions(directions.shape[0]))
            f, jvps = torch.func.vmap(jvp, out_dims=(None, 0))(*tangents)
        return f, jvps
