"""Matrix types: low-rank wide factors, Kronecker container and eigen form."""

from laplace_lora_backend.matrix.kron import LoRAKron
from laplace_lora_backend.matrix.kron_decomposed import LoRAKronDecomposed
from laplace_lora_backend.matrix.lowrank import LowRankFactor
from laplace_lora_backend.matrix.lowrank_options import LowRankResidual

__all__ = ["LoRAKron", "LoRAKronDecomposed", "LowRankFactor", "LowRankResidual"]
