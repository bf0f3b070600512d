"""Model loading from one spec string, and TransformerLens-style site names."""

from featurelens.models.loading import BUNDLED_MODELS, LoadedModel, list_models, load_model
from featurelens.models.sites import Site, SiteMap, list_sites, parse_site, site_map

__all__ = [
    "BUNDLED_MODELS",
    "LoadedModel",
    "Site",
    "SiteMap",
    "list_models",
    "list_sites",
    "load_model",
    "parse_site",
    "site_map",
]
