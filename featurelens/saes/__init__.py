"""Sparse autoencoders: one module per architecture over a small base class and a registry."""

from featurelens.saes import batchtopk, clt, gated, jumprelu, matryoshka, relu, topk  # noqa: F401  (registration)
from featurelens.saes.base import SAE, LossContext, LossOutput, SAEConfig, SAEOutput
from featurelens.saes.formats import load_sae
from featurelens.saes.registry import architectures, get_architecture

__all__ = [
    "SAE",
    "LossContext",
    "LossOutput",
    "SAEConfig",
    "SAEOutput",
    "architectures",
    "get_architecture",
    "load_sae",
]
