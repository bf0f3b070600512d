"""``featurelens explain BROWSER``: explanations and their detection / fuzzing scores for a browser's latents,
with the random-explanation baseline, written into the browser (``data/explanations.js``, shown in the index,
on latent pages and in search) and summarised in ``autointerp.json``. Resumable: each explanation and each
score is appended to a JSONL file as soon as it exists, and a rerun skips what is there."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from featurelens.configs import check_device, check_ranges
from featurelens.errors import UsageError


@dataclass
class ExplainConfig:
    """Automatic interpretation of a feature browser's latents (explainer + scorer, random-explanation baseline)."""

    explainer: str = "smollm2-135m-instruct"
    """Explainer: a model spec (bundled alias, folder, .gguf, hub id) or an OpenAI-compatible endpoint URL
    ending in /v1 (llama.cpp server, vLLM, ollama)."""
    scorer: str = ""
    """Scorer, the same kinds; empty: the explainer."""
    endpoint_model: str = ""
    """Model name sent to an endpoint."""
    latents: int = 200
    """How many live latents to explain (a seeded random sample, in id order)."""
    examples: int = 10
    """Activating contexts shown to the explainer."""
    score_examples: int = 10
    """Activating and non-activating contexts per score."""
    max_new_tokens: int = 40
    """Longest explanation (tokens)."""
    seed: int = 0
    """Seed for the latent sample, the scored examples and the baseline's pairing."""
    device: str = "auto"
    """cpu, cuda or auto (local models)."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("latents", "examples", "score_examples", "max_new_tokens"), non_negative=("seed",))
        check_device(self.device)


def _backend(spec: str, cfg: ExplainConfig, cache: dict[str, Any]) -> Any:
    from featurelens.browse.autointerp import EndpointBackend, LocalBackend

    if spec not in cache:
        if spec.startswith(("http://", "https://")):
            cache[spec] = EndpointBackend(spec, cfg.endpoint_model)
        else:
            from featurelens.models.loading import load_model

            cache[spec] = LocalBackend(load_model(spec, device=cfg.device))
    return cache[spec]


def _read_jsonl(path: Path) -> dict[int, dict[str, Any]]:
    """Records by latent id; a torn last line (an interrupted write) is ignored."""
    out: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                out[int(rec["id"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _append(path: Path, rec: dict[str, Any]) -> None:
    import os

    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def explain_browser(cfg: ExplainConfig, folder: str | Path, backends: dict[str, Any] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Explain and score; returns the summary written to ``autointerp.json``."""
    from featurelens.atomic import atomic_write_bytes
    from featurelens.browse.autointerp import explain, mean_ci, score_many
    from featurelens.browse.site import _js, read_data
    from featurelens.outputs import output_lock

    root = Path(folder)
    if not (root / "data" / "index.js").is_file():
        raise UsageError(f"{root} is not one dictionary's browser (no data/index.js): give <browse --out>/<name>")
    index = read_data(root, "index")
    shard = int(index["meta"]["shard"])
    live = [int(r[0]) for r in index["rows"] if r[1] > 0]
    if len(live) < 2:
        raise UsageError(f"{root}: fewer than 2 latents ever fired: nothing to compare explanations across")
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(rng.choice(live, size=min(cfg.latents, len(live)), replace=False).tolist())
    cache = backends if backends is not None else {}
    explainer = _backend(cfg.explainer, cfg, cache)
    scorer = _backend(cfg.scorer or cfg.explainer, cfg, cache)
    shards: dict[int, dict[int, Any]] = {}

    def latent(i: int) -> dict[str, Any]:
        s = i // shard
        if s not in shards:
            shards[s] = {int(x["id"]): x for x in read_data(root, f"l{s}")}
        return shards[s][i]

    with output_lock(root):
        ex_path, sc_path = root / "explanations.jsonl", root / "scores.jsonl"
        done = _read_jsonl(ex_path)
        todo = [i for i in chosen if i not in done]
        for i in tqdm(todo, desc="explain: explanations", unit="latent", disable=not progress, file=sys.stderr):
            rec = {"id": i, "text": explain(explainer, latent(i), cfg.examples, cfg.max_new_tokens)}
            _append(ex_path, rec)
            done[i] = rec
        other = dict(zip(chosen, np.roll(np.random.default_rng(cfg.seed + 1).permutation(chosen), 1).tolist()))
        scored = _read_jsonl(sc_path)
        todo = [i for i in chosen if i not in scored]
        for i in tqdm(todo, desc="explain: scores", unit="latent", disable=not progress, file=sys.stderr):
            lat = latent(i)
            own, rnd = score_many(scorer, [done[i]["text"], done[int(other[i])]["text"]], lat,
                                  np.random.default_rng([cfg.seed, i, 0]), cfg.score_examples)
            rec = {"id": i, **own, **{f"random_{k}": v for k, v in rnd.items()}, "random_from": int(other[i])}
            _append(sc_path, rec)
            scored[i] = rec
        out = {str(i): {"text": done[i]["text"], "score": _num(scored[i]["detection"]), "fuzzing": _num(scored[i]["fuzzing"]),
                        "random_score": _num(scored[i]["random_detection"])} for i in chosen}
        atomic_write_bytes(root / "data" / "explanations.js", _js("explanations", out))
        metrics = ("detection", "fuzzing", "detection_accuracy", "fuzzing_accuracy")
        summary: dict[str, Any] = {"n_latents": len(chosen), "explainer": cfg.explainer, "scorer": cfg.scorer or cfg.explainer}
        for m in metrics:
            summary[m] = mean_ci([scored[i][m] for i in chosen], cfg.seed)
            summary[f"random_{m}"] = mean_ci([scored[i][f"random_{m}"] for i in chosen], cfg.seed)
        atomic_write_bytes(root / "autointerp.json", json.dumps(summary, indent=1).encode())
    return summary


def _num(v: Any) -> float | None:
    return None if v is None or v != v else round(float(v), 4)
