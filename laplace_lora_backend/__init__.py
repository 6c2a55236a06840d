"""Laplace-LoRA for laplace-torch.

Importing this package registers ``subset_of_weights="lora"`` with
`laplace.Laplace` for ``hessian_structure`` ``"kron"``, ``"diag"`` and
``"full"``::

    import laplace_lora_backend  # noqa: F401
    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="lora",
                 hessian_structure="kron")

A PEFT causal LM passed as is (``(batch, tokens, vocab)`` logits) is a
language model: fit it on batches whose ``labels`` are
``next_token_labels(input_ids, attention_mask)`` with the MC Fisher
(``backend_kwargs={"stochastic": True}``) or ``backend=LoRAEF``, then
``la.next_token_predictive(batch, "nn" | "glm")`` and ``la.generate(...)``.
"""

from laplace_lora_backend._version import __version__ as __version__
from laplace_lora_backend.curvature import (
    KFACApprox,
    LoRAEF,
    LoRAGGN,
    LoRAInterface,
    LoRAWeight,
    find_lora_weights,
)
from laplace_lora_backend.curvature.token_loss import next_token_labels
from laplace_lora_backend.errors import (
    AdapterMismatchError,
    BatchKeyError,
    LoRAAdaptersChangedError,
    LoRALayerNotFoundError,
    NonFiniteError,
    NotFittedError,
    UnsupportedLoRALayerError,
)
from laplace_lora_backend.generation import GenerationOutput
from laplace_lora_backend.loralaplace import LoRALaplace
from laplace_lora_backend.next_token import TokenPredictive
from laplace_lora_backend.serialization import load_posterior, save_posterior
from laplace_lora_backend.structures import (
    LoRADiagLaplace,
    LoRAFullLaplace,
    LoRAKronLaplace,
)
from laplace_lora_backend.trust_region import TrustRegion
from laplace_lora_backend.uncertainty import PredictiveUncertainty

__all__ = [
    "AdapterMismatchError",
    "BatchKeyError",
    "GenerationOutput",
    "KFACApprox",
    "LoRADiagLaplace",
    "LoRAEF",
    "LoRAFullLaplace",
    "LoRAGGN",
    "LoRAInterface",
    "LoRAKronLaplace",
    "LoRAAdaptersChangedError",
    "LoRALaplace",
    "LoRALayerNotFoundError",
    "NonFiniteError",
    "NotFittedError",
    "PredictiveUncertainty",
    "TokenPredictive",
    "TrustRegion",
    "LoRAWeight",
    "UnsupportedLoRALayerError",
    "find_lora_weights",
    "load_posterior",
    "next_token_labels",
    "save_posterior",
]
