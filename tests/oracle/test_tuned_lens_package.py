"""Oracle: the ``tuned-lens`` package, trained on the same activations with its own lens, optimiser and
schedule (as its train_loop does), ends at the same translators as ours, and reads the untrained lens the
same. Runs where the package installs (``bash benchmarks/setup_peers.sh``, then
``.bench-venv/bin/python -m pytest tests/oracle``); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from featurelens.lens.tuned import TunedLensFitter, final_site, lens_sites
from featurelens.models.hooks import ActivationCapture
from featurelens.models.readout import residual_logits
from featurelens.models.sites import SiteMap
from featurelens.testing import tiny_model

pytest.importorskip("tuned_lens", reason="tuned-lens is not installed (see benchmarks/setup_peers.sh)")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_package_trains_to_the_same_translators(family: str) -> None:
    from tuned_lens import TunedLens

    from benchmarks.tuned_lens_side import train_package_lens

    model = tiny_model(family, seed=1)
    sm = SiteMap(model)
    with torch.no_grad():  # sharper logits (the embeddings may be tied: scale the final norm's gain instead)
        sm.final_norm().weight.mul_(20)
    rows = [s.name for s in lens_sites(sm)]
    fin = final_site(sm).name
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    with ActivationCapture(model, [*rows, fin]) as cap:
        acts = {k: v.reshape(-1, sm.d_model) for k, v in cap.forward(ids).items()}
    idx = {s: 0 if s == "blocks.0.hook_resid_pre" else int(s.split(".")[1]) + 1 for s in rows}
    batch = {"final": acts[fin], **{f"h.{idx[s]}": acts[s] for s in rows}}
    # the untrained lens: their readout is ours
    lens = TunedLens.from_model(model).float()
    for s in rows:
        torch.testing.assert_close(lens(acts[s], idx=idx[s]).float(), residual_logits(model, acts[s]), rtol=1e-5,
                                   atol=1e-5)
    steps = 4
    theirs, _ = train_package_lens(model, batch, steps)
    fit = TunedLensFitter(model, rows, steps, micro_batch=10_000, precondition=False)  # the package's parametrisation
    for _ in range(steps):
        fit.step(acts)
    assert float(fit.weight.detach().abs().max()) > 1e-3  # it moved, so the comparison below means something
    for r, s in enumerate(rows):
        torch.testing.assert_close(fit.weight[r].detach(), theirs[f"weight.{idx[s]}"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fit.bias[r].detach(), theirs[f"bias.{idx[s]}"], rtol=1e-4, atol=1e-6)
