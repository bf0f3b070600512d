"""featurelens: mechanistic interpretability toolkit for Hugging Face causal language models."""

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.activations.store import ActivationStore
from featurelens.errors import FeatureLensError
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel, load_model
from featurelens.models.sites import Site, SiteMap, parse_site

__version__ = "0.1.0"

__all__ = [
    "ActivationCapture",
    "ActivationStore",
    "FeatureLensError",
    "HarvestConfig",
    "LoadedModel",
    "Site",
    "SiteMap",
    "harvest",
    "load_model",
    "parse_site",
]
