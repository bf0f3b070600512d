"""Plots (PNG) and the HTML report. All text placed in HTML goes through ``html.escape``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from featurelens.atomic import atomic_write_bytes
from featurelens.jsonio import dumps_strict


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def density_histogram(log10_freq: np.ndarray, path: Path, title: str) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    finite = log10_freq[np.isfinite(log10_freq)]
    dead = int((~np.isfinite(log10_freq)).sum())
    ax.hist(finite, bins=50, color="#3a6ea5")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} (dead: {dead})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_plot(points: list[dict[str, Any]], x: str, y: str, path: Path, ylabel: str) -> Path | None:
    plt = _plt()
    if plt is None or not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(str(p.get("architecture", "?")), []).append(p)
    for arch, ps in sorted(groups.items()):
        ps = sorted(ps, key=lambda p: p[x])
        ax.plot([p[x] for p in ps], [p[y] for p in ps], marker="o", label=arch)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tok(t: str) -> str:
    return html.escape(t.replace("\n", "\u23ce"))


def context_html(tokens: list[str], acts: list[float], center: int, max_act: float) -> str:
    """One context: tokens with a background whose strength follows the latent's activation."""
    parts = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = 0.0 if max_act <= 0 else max(0.0, min(1.0, a / max_act))
        style = f"background: rgba(255,120,0,{alpha:.2f});"
        if i == center:
            style += " outline: 1px solid #a33;"
        title = html.escape(f"{a:.3f}")
        parts.append(f'<span class="t" style="{style}" title="{title}">{_tok(t)}</span>')
    return "".join(parts)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; }
th { background: #f3f3f3; } .t { font-family: monospace; white-space: pre; font-size: 12px; }
.latent { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.ctx { margin: 2px 0; } .pos { color: #1a7f37; } .neg { color: #b42318; } img { max-width: 100%; }
.small { color: #666; font-size: 12px; }
"""


def write_page(path: Path, title: str, body: str) -> Path:
    """Write a standalone HTML page (shared CSS; ``title`` is escaped, ``body`` must already be safe HTML)
    atomically."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def write_report(out: Path, title: str, metrics: list[dict[str, Any]], images: dict[str, str],
                 latents: dict[str, list[dict[str, Any]]], notes: list[str]) -> Path:
    """Write ``report.html`` (and ``metrics.json``) under ``out``."""
    keys = ["fvu", "mse", "cos_sim", "l0", "l1", "dead_fraction", "dense_fraction", "ce_loss_clean",
            "ce_loss_spliced", "delta_lm_loss", "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_div"]
    rows = []
    for m in metrics:
        cells = "".join(f"<td>{html.escape(_fmt(m.get(k)))}</td>" for k in keys)
        rows.append(f"<tr><td>{html.escape(str(m['name']))}</td><td>{html.escape(str(m.get('architecture')))}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["sae", "architecture", *keys])
    imgs = "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(k)}"><figcaption class="small">'
                   f"{html.escape(k)}</figcaption></figure>" for k, p in images.items())
    lat_html = []
    for sae_name, lats in latents.items():
        lat_html.append(f"<h2>Latents of {html.escape(sae_name)}</h2>")
        for lt in lats:
            promo = ", ".join(f'<span class="pos t">{_tok(t)}</span> {v:+.2f}' for t, v in lt.get("promoted", []))
            supp = ", ".join(f'<span class="neg t">{_tok(t)}</span> {v:+.2f}' for t, v in lt.get("suppressed", []))
            ctxs = "".join(f'<div class="ctx">{c}</div>' for c in lt["contexts_html"])
            lat_html.append(
                f'<div class="latent"><b>latent {lt["index"]}</b> <span class="small">firing frequency '
                f'{lt["frequency"]:.2e}, max activation {lt["max_act"]:.3f}</span>'
                + (f"<div>promotes: {promo}</div><div>suppresses: {supp}</div>" if promo else "")
                + f"{ctxs}</div>")
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    path = write_page(out / "report.html", title,
                      f"<h1>{html.escape(title)}</h1><ul class='small'>{note_html}</ul>"
                      f"<table><tr>{head}</tr>{''.join(rows)}</table>{imgs}{''.join(lat_html)}")
    atomic_write_bytes(out / "metrics.json", dumps_strict(metrics).encode())
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
