"""Compare feature spaces across models and layers: token alignment, latent matching, SVCCA/RSA with nulls."""

from featurelens.compare.matching import CorrelationAccumulator, Matching, match_latents
from featurelens.compare.run import CompareConfig, run_compare
from featurelens.compare.similarity import rsa, rsa_test, svcca, svcca_full, svcca_test

__all__ = ["CompareConfig", "CorrelationAccumulator", "Matching", "match_latents", "rsa", "rsa_test", "run_compare",
           "svcca", "svcca_full", "svcca_test"]
