"""BatchTopK SAE (Bussmann et al. 2024, *BatchTopK Sparse Autoencoders*).

Training keeps the ``k * batch`` largest ReLU'd pre-activations across the whole batch, so the number
of active latents varies per token around ``k``. For inference the batch dependence is replaced by a
single threshold ``theta`` estimated during training (a running mean of the smallest kept activation
per batch): ``f = z * H(z - theta)``, i.e. a JumpReLU with one shared threshold, saved as SAELens
``jumprelu`` with ``threshold`` filled with theta. Decoder rows at unit norm; AuxK as in TopK.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from featurelens.distributed import all_reduce
from featurelens.saes.base import SAE, LossContext, LossOutput, SAEConfig, SAEOutput
from featurelens.saes.registry import register
from featurelens.saes.topk import topk_family_loss

THRESHOLD_MOMENTUM = 0.99


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Keep the ``k * batch`` largest ReLU'd entries of ``pre`` over the whole batch."""
    z = torch.relu(pre)
    flat = z.reshape(-1)
    n = min(flat.numel(), k * pre.shape[0])
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).reshape(pre.shape)


@register
class BatchTopKSAE(SAE):
    architecture: ClassVar[str] = "batchtopk"
    saelens_architecture: ClassVar[str] = "jumprelu"
    unit_norm_decoder: ClassVar[bool] = True
    resample_enc_factor: ClassVar[float] = 1.0
    threshold: Tensor
    threshold_initialised: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    @property
    def k(self) -> int:
        assert self.cfg.k is not None, "BatchTopK SAE needs cfg.k"
        return int(self.cfg.k)

    def activate(self, pre: Tensor) -> Tensor:
        if self.training:
            return batch_topk(pre, self.k)
        return self.activate_inference(pre)

    def activate_inference(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold).to(pre.dtype) * (pre > 0).to(pre.dtype)

    @torch.no_grad()
    def update_stats(self, out: SAEOutput, world: int = 1) -> None:
        f = out.dense_feats(self.cfg.d_sae)
        pos = f[f > 0]
        # smallest kept activation of the global batch: min over ranks (inf where a rank kept none)
        m = pos.min().reshape(1).float() if pos.numel() else f.new_full((1,), float("inf"))
        m = all_reduce(m, world, "min")[0]
        if not bool(torch.isfinite(m)):
            return
        if bool(self.threshold_initialised):
            self.threshold.mul_(THRESHOLD_MOMENTUM).add_((1 - THRESHOLD_MOMENTUM) * m)
        else:
            self.threshold.fill_(float(m))
            self.threshold_initialised.fill_(True)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        return topk_family_loss(self, x, out, ctx)

    def weights_for_saving(self) -> dict[str, Tensor]:
        w = super().weights_for_saving()
        w.pop("threshold_initialised", None)
        return w

    @staticmethod
    def weights_from_saved(w: dict[str, Tensor]) -> dict[str, Tensor]:
        w = dict(w)
        w.setdefault("threshold_initialised", torch.tensor(True))
        return w
