"""Linear probes on a model's activations: fit, score, compare against baselines.

A :class:`Probe` holds one linear read-out per layer (``score = acts @ w + b``) at one site kind. Three ways
to make one, all from activations of labelled prompts (:func:`prompt_activations`, the last token of each):

* :func:`fit_diff_means`: ``w`` = mean(positives) - mean(negatives), ``b`` puts the threshold midway.
* :func:`fit_logistic`: L2-regularised logistic regression per layer, sklearn's objective
  ``0.5 |w|^2 + C * sum(log-loss)`` (intercept unpenalised) solved by Newton's method in float64 on
  standardised activations and folded back to raw ones; ``C`` chosen per layer by stratified k-fold
  cross-validation on the held-out log-loss (sklearn's ``LogisticRegressionCV`` picks by accuracy; the
  log-loss does not tie on separable data).
* :func:`from_directions`: a direction from elsewhere (a refusal direction, an SAE latent's encoder row, a
  contrast pair), bias 0.

:func:`evaluate` scores a probe per layer: AUROC with a bootstrap interval, and the accuracy at a threshold
chosen on a validation split. The baselines every report shows next to it: :func:`random_baseline`
(random directions of the probe's norm) and a probe fit on shuffled labels (:func:`shuffled`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import read_json
from featurelens.stats import auroc_ci, balanced_accuracy, best_threshold

CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
"""Default grid of inverse regularisation strengths for :func:`fit_logistic`."""


@dataclass(frozen=True)
class Probe:
    """One linear read-out per layer at ``blocks.{layer}.{site}``."""

    weight: Tensor
    """``[n_layers, d]`` float32, row ``i`` for ``layers[i]``."""
    bias: Tensor
    """``[n_layers]`` float32."""
    layers: tuple[int, ...]
    """The model layers the rows belong to."""
    kind: str
    """How it was made: ``diff_means``, ``logistic``, ``given``, ``contrast``, ``shuffled-...``."""
    site: str = "hook_resid_post"
    """Site kind within each block (TransformerLens name)."""
    info: str = "{}"
    """JSON of facts about the fit (model, prompt counts, chosen C per layer)."""

    def row(self, layer: int) -> int:
        if layer not in self.layers:
            raise UsageError(f"the probe has no layer {layer}: it covers {list(self.layers)}")
        return self.layers.index(layer)

    def score(self, acts: Tensor) -> Tensor:
        """``[n_layers, n]`` scores of ``acts [n_layers, n, d]`` (rows in the probe's layer order)."""
        if acts.shape[0] != len(self.layers) or acts.shape[-1] != self.weight.shape[1]:
            raise UsageError(f"activations {tuple(acts.shape)} do not match the probe ({len(self.layers)} layers, "
                             f"d={self.weight.shape[1]}): collect them at the probe's layers")
        return torch.einsum("lnd,ld->ln", acts.double(), self.weight.double()).float() + self.bias[:, None]

    def save(self, path: str | Path) -> Path:
        from featurelens.atomic import atomic_dir

        with atomic_dir(path, "probe", owned=True) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp / "probe.safetensors"))
            (tmp / "probe.json").write_text(json.dumps({"layers": list(self.layers), "kind": self.kind, "site": self.site,
                                                        "info": json.loads(self.info)}, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        p = Path(path)
        meta = read_json(p / "probe.json", "fit the probe again")
        try:
            t = load_file(str(p / "probe.safetensors"))
        except (OSError, SafetensorError) as e:
            raise FeatureLensError(f"{p / 'probe.safetensors'} cannot be read ({type(e).__name__}): fit the probe again") from None
        return cls(t["weight"], t["bias"], tuple(int(x) for x in meta["layers"]), str(meta["kind"]),
                   str(meta.get("site", "hook_resid_post")), json.dumps(meta.get("info", {})))


@torch.no_grad()
def prompt_activations(lm: Any, texts: Sequence[str], layers: Sequence[int], site: str = "hook_resid_post",
                       chat: bool = True, batch_size: int = 16, progress: bool = False, desc: str = "activations") -> Tensor:
    """``[len(layers), n, d]`` float32 activations at the last token of each text.

    ``chat``: each text is a user message, formatted with the model's chat template and its generation prompt
    (the last token is the template's last). Otherwise the texts are token sequences already (e.g. a chat
    transcript ending in the assistant's answer) and are tokenized as they are."""
    from featurelens.directions.prompts import format_instruction, left_pad
    from featurelens.models.hooks import ActivationCapture

    if not texts:
        raise UsageError("no prompts to collect activations from")
    tok = lm.tokenizer
    sites = [f"blocks.{layer}.{site}" for layer in layers]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
    out = []
    with ActivationCapture(lm.model, sites) as cap:
        for b in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = [format_instruction(tok, t) if chat else t for t in texts[b:b + batch_size]]
            pb = left_pad([list(tok(t, add_special_tokens=False)["input_ids"]) for t in chunk], pad, lm.device)
            acts = cap.forward(pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids)
            out.append(torch.stack([acts[s][:, -1].float().cpu() for s in sites]))
    return torch.cat(out, dim=1)


def fit_diff_means(pos: Tensor, neg: Tensor, layers: Sequence[int], site: str = "hook_resid_post",
                   info: dict[str, Any] | None = None) -> Probe:
    """Difference in means per layer (``pos``, ``neg``: ``[n_layers, n, d]``); threshold midway between them."""
    mp, mn = pos.double().mean(1), neg.double().mean(1)
    w = mp - mn
    b = -(w * (mp + mn) / 2).sum(-1)
    return Probe(w.float(), b.float(), tuple(layers), "diff_means", site,
                 json.dumps({"n_pos": pos.shape[1], "n_neg": neg.shape[1], **(info or {})}))


def from_directions(vectors: Tensor, layers: Sequence[int], kind: str = "given", site: str = "hook_resid_post",
                    info: dict[str, Any] | None = None) -> Probe:
    """A probe from given directions (``[d]`` for every layer, or ``[n_layers, d]``), bias 0."""
    v = vectors.float()
    v = v[None].expand(len(layers), -1) if v.dim() == 1 else v
    if v.shape[0] != len(layers):
        raise UsageError(f"{v.shape[0]} directions for {len(layers)} layers: give one per layer, or one for all")
    return Probe(v.clone().contiguous(), torch.zeros(len(layers)), tuple(layers), kind, site, json.dumps(info or {}))


def logistic_l2(X: Tensor, y: Tensor, C: float, max_iter: int = 100, tol: float = 1e-10) -> tuple[Tensor, float]:
    """Minimise ``0.5 |w|^2 + C * sum_i log(1 + exp(-s_i (x_i.w + b)))`` (``s_i = +-1``, ``b`` unpenalised) by
    damped Newton steps in float64; returns ``(w, b)``."""
    X = X.double()
    n, d = X.shape
    Xb = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    s = y.double() * 2 - 1
    theta = torch.zeros(d + 1, dtype=torch.float64)
    reg = torch.ones(d + 1, dtype=torch.float64)
    reg[-1] = 0.0

    def f(t: Tensor) -> float:
        return float(0.5 * (reg * t * t).sum() + C * torch.nn.functional.softplus(-s * (Xb @ t)).sum())

    fx = f(theta)
    for _ in range(max_iter):
        z = s * (Xb @ theta)
        sig = torch.sigmoid(-z)  # d loss_i / d z_i = -sig
        grad = reg * theta - C * Xb.T @ (s * sig)
        h = C * (Xb.T * (sig * (1 - sig))) @ Xb + torch.diag(reg) + 1e-12 * torch.eye(d + 1, dtype=torch.float64)
        step = torch.linalg.solve(h, grad)
        t, new = 1.0, fx
        while t > 1e-10:  # backtracking (Armijo)
            new = f(theta - t * step)
            if new <= fx - 1e-4 * t * float(grad @ step):
                break
            t /= 2
        theta, dec = theta - t * step, fx - new
        fx = new
        if float(grad.abs().max()) < tol or dec < tol * max(1.0, abs(fx)):
            break
    return theta[:-1].clone(), float(theta[-1])


def _folds(y: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Stratified folds: each class's shuffled indices dealt round-robin."""
    fold = np.zeros(y.size, np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(idx.size) % k
    return [np.flatnonzero(fold == i) for i in range(k)]


def fit_logistic(pos: Tensor, neg: Tensor, layers: Sequence[int], Cs: Sequence[float] = CS, folds: int = 5,
                 seed: int = 0, site: str = "hook_resid_post", info: dict[str, Any] | None = None,
                 progress: bool = False) -> Probe:
    """L2 logistic regression per layer, ``C`` by stratified ``folds``-fold cross-validated log-loss."""
    n_p, n_n = pos.shape[1], neg.shape[1]
    if min(n_p, n_n) < folds:
        raise UsageError(f"{n_p} positives and {n_n} negatives: cross-validation needs at least {folds} of each "
                         "(give more prompts or fewer --folds)")
    y = torch.cat([torch.ones(n_p), torch.zeros(n_n)])
    parts = _folds(y.numpy(), folds, np.random.default_rng(seed))
    W, B, chosen = [], [], []
    for li in tqdm(range(len(layers)), desc="logistic probes", disable=not progress, leave=False):
        X = torch.cat([pos[li], neg[li]]).double()
        mu, sd = X.mean(0), X.std(0, correction=0).clamp_min(1e-8)
        Z = (X - mu) / sd
        losses = []
        for C in Cs:
            tot = 0.0
            for va in parts:
                tr = np.setdiff1d(np.arange(y.numel()), va)
                w, b = logistic_l2(Z[tr], y[tr], C)
                z = (Z[va] @ w + b) * (y[va].double() * 2 - 1)
                tot += float(torch.nn.functional.softplus(-z).sum())
            losses.append(tot)
        C = float(Cs[int(np.argmin(losses))])
        w, b = logistic_l2(Z, y, C)
        W.append(w / sd)
        B.append(b - float((w / sd) @ mu))
        chosen.append(C)
    return Probe(torch.stack(W).float(), torch.tensor(B, dtype=torch.float32), tuple(layers), "logistic", site,
                 json.dumps({"n_pos": n_p, "n_neg": n_n, "C": chosen, "folds": folds, **(info or {})}))


def shuffled(fit: Callable[..., Probe], pos: Tensor, neg: Tensor, layers: Sequence[int], seed: int = 0,
             **kw: Any) -> Probe:
    """The same fit on the same activations with the labels shuffled (keeping the class sizes)."""
    X = torch.cat([pos, neg], dim=1)
    perm = torch.randperm(X.shape[1], generator=torch.Generator().manual_seed(seed))
    p = fit(X[:, perm[:pos.shape[1]]], X[:, perm[pos.shape[1]:]], layers, **kw)
    return Probe(p.weight, p.bias, p.layers, f"shuffled-{p.kind}", p.site, p.info)


@dataclass(frozen=True)
class LayerScore:
    """How well one layer's probe separates positives from negatives on a test set."""

    layer: int
    auroc: float
    """P(positive scores above negative), ties half."""
    lo: float
    """2.5% bootstrap quantile of the AUROC."""
    hi: float
    """97.5% bootstrap quantile."""
    accuracy: float
    """Balanced accuracy on the test set at ``threshold``."""
    threshold: float
    """Chosen on the validation set (the probe's own bias when none is given)."""

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in self.__dict__.items()}


def evaluate(probe: Probe, pos: Tensor, neg: Tensor, val_pos: Tensor | None = None, val_neg: Tensor | None = None,
             draws: int = 1000, seed: int = 0) -> list[LayerScore]:
    """Per-layer AUROC (with a bootstrap interval) and balanced accuracy of ``probe`` on test activations."""
    sp, sn = probe.score(pos).numpy(), probe.score(neg).numpy()
    vp = probe.score(val_pos).numpy() if val_pos is not None else None
    vn = probe.score(val_neg).numpy() if val_neg is not None else None
    out = []
    for i, layer in enumerate(probe.layers):
        a, lo, hi = auroc_ci(sp[i], sn[i], draws, seed)
        t = best_threshold(vp[i], vn[i]) if vp is not None and vn is not None else 0.0
        out.append(LayerScore(layer, a, lo, hi, balanced_accuracy(sp[i], sn[i], t), t))
    return out


def random_baseline(probe: Probe, pos: Tensor, neg: Tensor, n: int = 32, seed: int = 0) -> list[dict[str, float]]:
    """Per layer: AUROC of ``n`` Gaussian random directions with each probe row's norm (mean, 2.5% and 97.5%
    quantiles over the directions, and the mean of ``|AUROC - 0.5|``: on easily separated data single random
    directions land far from 0.5 on either side while their mean stays near it)."""
    g = torch.Generator().manual_seed(seed)
    d = probe.weight.shape[1]
    out = []
    for i, layer in enumerate(probe.layers):
        r = torch.randn(n, d, generator=g, dtype=torch.float64)
        r = r / r.norm(dim=1, keepdim=True) * float(probe.weight[i].double().norm())
        a = np.array([auroc_ci((pos[i].double() @ v).numpy(), (neg[i].double() @ v).numpy(), 0)[0] for v in r])
        out.append({"layer": layer, "auroc": round(float(a.mean()), 4), "lo": round(float(np.quantile(a, 0.025)), 4),
                    "hi": round(float(np.quantile(a, 0.975)), 4),
                    "abs_dev": round(float(np.abs(a - 0.5).mean()), 4)})  # a mean of 0.5 can hide a wide spread
    return out


def generalization(probes: dict[str, Probe], tests: dict[str, tuple[Tensor, Tensor]], layer: int) -> dict[str, dict[str, float]]:
    """AUROC at ``layer`` of every probe (fit on one condition) on every condition's test set:
    ``{probe: {condition: auroc}}``."""
    return {name: {cond: round(auroc_ci(p.score(tp)[p.row(layer)].numpy(), p.score(tn)[p.row(layer)].numpy(), 0)[0], 4)
                   for cond, (tp, tn) in tests.items()} for name, p in probes.items()}


def plot_layers(curves: dict[str, Sequence[LayerScore] | Sequence[dict[str, float]]], path: str | Path,
                title: str = "probe AUROC by layer") -> Path:
    """AUROC against layer for each probe kind (shaded: the bootstrap interval), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        rs = [r.as_dict() if isinstance(r, LayerScore) else r for r in rows]
        x = [r["layer"] for r in rs]
        ax.plot(x, [r["auroc"] for r in rs], marker="o", ms=3, label=name)
        ax.fill_between(x, [r["lo"] for r in rs], [r["hi"] for r in rs], alpha=0.15)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="layer", ylabel="AUROC", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(p)
    return p
