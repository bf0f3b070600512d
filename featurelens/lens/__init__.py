"""Reading the model layer by layer and component by component: logit lens, direct logit attribution,
activation patching (sites and heads) and attribution patching, on the unmodified Hugging Face model."""

from featurelens.lens.attribution import DLAResult, direct_logit_attribution
from featurelens.lens.logit_lens import LensResult, logit_lens
from featurelens.lens.patching import (
    PatchResult,
    ablate_heads,
    attribution_patching,
    head_patching,
    logit_diff_metric,
    patch_site,
    patching_grid,
)

__all__ = ["DLAResult", "LensResult", "PatchResult", "ablate_heads", "attribution_patching", "direct_logit_attribution",
           "head_patching", "logit_diff_metric", "logit_lens", "patch_site", "patching_grid"]
