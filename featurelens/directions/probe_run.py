"""``featurelens probe``: fit linear probes that tell two prompt sets apart, at every chosen layer, and score
them on held-out prompts beside their baselines (random directions, shuffled labels).

Prompts are one per line (``.txt``) or JSONL with an ``instruction`` / ``prompt`` field. Without test files,
each set is split 60 / 20 / 20 into fit / validation / test by a seeded shuffle. Writes ``probes/<kind>/``
(safetensors + JSON, :class:`featurelens.directions.probes.Probe`), ``scores.json``, ``layers.png`` and
``report.html``.
"""

from __future__ import annotations

import html
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurelens.errors import UsageError


@dataclass
class ProbeConfig:
    """Fit linear probes separating --positive from --negative prompts; score them on held-out prompts."""

    positive: str = ""
    """File of positive prompts (e.g. triggered), one per line or JSONL."""
    negative: str = ""
    """File of negative prompts."""
    test_positive: str = ""
    """Held-out positive prompts (empty: 20% of --positive)."""
    test_negative: str = ""
    """Held-out negative prompts (empty: 20% of --negative)."""
    model: str = "smollm2-135m-instruct"
    """Model (bundled alias, hub id, local folder or GGUF file)."""
    layers: str = "all"
    """Layers to probe: 'all', 'every:N', or a comma list."""
    site: str = "hook_resid_post"
    """Site kind inside each block."""
    kinds: str = "diff_means,logistic"
    """Probe kinds to fit: diff_means, logistic."""
    chat: bool = True
    """Format each prompt as a user turn of the model's chat template (activations at its last token)."""
    seed: int = 0
    """Seed of the split, the cross-validation folds and the baselines."""
    batch_size: int = 16
    """Prompts per forward pass."""
    device: str = "cpu"
    """Device to run the model on."""
    out: str = "runs/probe"
    """Output folder."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("batch_size",), non_negative=("seed",))
        check_device(self.device)
        if not self.positive or not self.negative:
            raise UsageError("--positive and --negative are required: give two prompt files")
        bad = set(self.kind_list) - {"diff_means", "logistic"}
        if bad:
            raise UsageError(f"--kinds {','.join(sorted(bad))} unknown: choose from diff_means, logistic")
        if bool(self.test_positive) != bool(self.test_negative):
            raise UsageError("give both --test-positive and --test-negative, or neither")

    @property
    def kind_list(self) -> list[str]:
        return [k.strip() for k in self.kinds.split(",") if k.strip()]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    s = spec.strip()
    if s == "all":
        return list(range(n_layers))
    if s.startswith("every:"):
        step = int(s.split(":", 1)[1]) if s.split(":", 1)[1].isdigit() else 0
        if step <= 0:
            raise UsageError(f"--layers {spec!r}: every:N needs a positive N")
        return list(range(0, n_layers, step))
    try:
        layers = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--layers {spec!r} is not 'all', 'every:N' or a comma list of integers") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise UsageError(f"--layers {spec!r}: the model has layers 0..{n_layers - 1}")
    return layers


def _split(xs: list[str], seed: int, cuts: tuple[float, ...]) -> list[list[str]]:
    """A seeded shuffle of ``xs`` cut at the given fractions."""
    xs = list(xs)
    random.Random(seed).shuffle(xs)
    at = [0, *(int(c * len(xs)) for c in cuts), len(xs)]
    return [xs[a:b] for a, b in zip(at, at[1:])]


def run_probe(cfg: ProbeConfig, lm: Any = None, progress: bool = True) -> dict[str, Any]:
    from featurelens.atomic import atomic_write_bytes
    from featurelens.directions.instructions import read_instructions
    from featurelens.directions.probes import (
        Probe,
        evaluate,
        fit_diff_means,
        fit_logistic,
        plot_layers,
        prompt_activations,
        random_baseline,
        shuffled,
    )
    from featurelens.models.loading import load_model
    from featurelens.outputs import check_out, make_out, output_lock

    pos, neg = read_instructions(cfg.positive), read_instructions(cfg.negative)
    if cfg.test_positive:  # test sets given: fit on 75%, validate on 25%
        (pf, pv), (nf, nv) = _split(pos, cfg.seed, (0.75,)), _split(neg, cfg.seed, (0.75,))
        pt, nt = read_instructions(cfg.test_positive), read_instructions(cfg.test_negative)
    else:
        (pf, pv, pt), (nf, nv, nt) = _split(pos, cfg.seed, (0.6, 0.8)), _split(neg, cfg.seed, (0.6, 0.8))
    if min(len(pf), len(nf)) < 5 or min(len(pv), len(nv), len(pt), len(nt)) < 2:
        raise UsageError(f"{len(pos)} positive and {len(neg)} negative prompts are too few to fit, validate and test: "
                         "give at least 10 of each")
    check_out(cfg.out, "probe")
    out = Path(cfg.out)
    with output_lock(out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        make_out(out, "probe")
        from featurelens.models.sites import SiteMap

        layers = parse_layers(cfg.layers, SiteMap(lm.model).n_layers)

        def acts(xs: list[str], desc: str) -> Any:
            return prompt_activations(lm, xs, layers, cfg.site, chat=cfg.chat, batch_size=cfg.batch_size,
                                      progress=progress, desc=desc)

        A = {k: acts(v, k) for k, v in (("fit+", pf), ("fit-", nf), ("val+", pv), ("val-", nv), ("test+", pt), ("test-", nt))}
        fits: dict[str, Callable[..., Probe]] = {"diff_means": fit_diff_means, "logistic": fit_logistic}
        info = {"model": lm.name}
        curves: dict[str, Any] = {}
        scores: dict[str, Any] = {}
        for kind in cfg.kind_list:
            probe = fits[kind](A["fit+"], A["fit-"], layers, site=cfg.site, info=info)
            probe.save(out / "probes" / kind)
            s = evaluate(probe, A["test+"], A["test-"], A["val+"], A["val-"], seed=cfg.seed)
            sh = evaluate(shuffled(fits[kind], A["fit+"], A["fit-"], layers, seed=cfg.seed), A["test+"], A["test-"],
                          A["val+"], A["val-"], seed=cfg.seed)
            curves[kind], curves[f"{kind} (shuffled labels)"] = s, sh
            scores[kind] = {"per_layer": [x.as_dict() for x in s], "shuffled_labels": [x.as_dict() for x in sh],
                            "best": max(s, key=lambda x: x.auroc).as_dict()}
            scores[kind]["random_directions"] = random_baseline(probe, A["test+"], A["test-"], seed=cfg.seed)
        first = cfg.kind_list[0]
        curves["random directions"] = scores[first]["random_directions"]
        plot_layers(curves, out / "layers.png")
        summary = {"model": cfg.model, "layers": layers, "site": cfg.site,
                   "n": {"fit": [len(pf), len(nf)], "val": [len(pv), len(nv)], "test": [len(pt), len(nt)]}, **scores}
        atomic_write_bytes(out / "scores.json", json.dumps(summary, indent=1).encode())
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['best']['layer']}</td><td>{v['best']['auroc']:.3f} "
                       f"[{v['best']['lo']:.3f}, {v['best']['hi']:.3f}]</td><td>{v['best']['accuracy']:.3f}</td></tr>"
                       for k, v in scores.items())
        page = (f"<!doctype html><meta charset='utf-8'><title>featurelens probes</title><h1>Probes: "
                f"{html.escape(cfg.model)}</h1><p>{len(pt)} positive and {len(nt)} negative held-out prompts; AUROC with "
                f"95% bootstrap intervals; accuracy (balanced) at the threshold chosen on validation.</p><table border=1>"
                f"<tr><th>probe</th><th>best layer</th><th>AUROC</th><th>accuracy</th></tr>{rows}</table>"
                f"<p><img src='layers.png' alt='AUROC by layer'></p>")
        atomic_write_bytes(out / "report.html", page.encode())
    return summary
