"""pmrl_kernels: fast, stable PMRL (Principled Multimodal Representation Learning) loss kernels."""
from .backends import available_backends
from .loss import GramSVD, PMRLLoss, gram_svd, pmrl_loss

__all__ = ["GramSVD", "PMRLLoss", "available_backends", "gram_svd", "pmrl_loss"]
__version__ = "0.1.0"
