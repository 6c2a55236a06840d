"""Laplace-LoRA for laplace-torch.

Importing this package registers ``subset_of_weights="lora"`` with
`laplace.Laplace` for ``hessian_structure`` ``"kron"``, ``"diag"`` and
``"full"``::

    import laplace_lora_backend  # noqa: F401
    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="lora",
                 hessian_structure="kron")
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
from laplace_lora_backend.errors import (
    AdapterMismatchError,
    BatchKeyError,
    LoRAAdaptersChangedError,
    LoRALayerNotFoundError,
    NonFiniteError,
    NotFittedError,
    UnsupportedLoRALayerError,
)
from laplace_lora_backend.loralaplace import LoRALaplace
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
    "TrustRegion",
    "LoRAWeight",
    "UnsupportedLoRALayerError",
    "find_lora_weights",
    "load_posterior",
    "save_posterior",
]
