"""HTML for the lens and patching reports: heat maps as coloured tables (hover for numbers), no
JavaScript, every string from the model or the user escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from torch import Tensor


def _tok(t: str) -> str:
    return html.escape(t.replace("\n", "\u23ce").replace(" ", "\u2423"))


def _blue_red(v: float, vmax: float) -> str:
    """Red for positive, blue for negative, white at zero; NaN grey."""
    if not math.isfinite(v):
        return "#eee"
    a = 0.0 if vmax <= 0 else max(-1.0, min(1.0, v / vmax))
    if a >= 0:
        return f"rgba(214,39,40,{a:.2f})"
    return f"rgba(31,119,180,{-a:.2f})"


def token_heatmap(rows: Sequence[str], columns: Sequence[str], tokens: list[list[str]], probs: Tensor,
                  caption: str) -> str:
    """A (rows x positions) table whose cells show a token and are shaded by its probability."""
    head = "".join(f"<th class='t'>{_tok(c)}</th>" for c in columns)
    body = []
    for r, name in enumerate(rows):
        cells = []
        for c in range(len(columns)):
            p = float(probs[r, c])
            cells.append(f"<td class='t' style='background: rgba(255,120,0,{p:.2f})' "
                         f"title='{html.escape(f'p = {p:.3f}')}'>{_tok(tokens[r][c])}</td>")
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (f"<table><caption>{html.escape(caption)}</caption><tr><th>layer \\ token</th>{head}</tr>"
            f"{''.join(body)}</table>")


def value_heatmap(rows: Sequence[str], columns: Sequence[str], values: Tensor, caption: str,
                  fmt: str = "{:.2f}") -> str:
    """A (rows x columns) table of numbers, red positive / blue negative, scaled to the largest |value|."""
    finite = [abs(float(v)) for v in values.flatten() if math.isfinite(float(v))]
    vmax = max(finite) if finite else 1.0
    head = "".join(f"<th class='t'>{_tok(c)}</th>" for c in columns)
    body = []
    for r, name in enumerate(rows):
        cells = "".join(
            f"<td style='background: {_blue_red(float(v), vmax)}' title='{html.escape(fmt.format(float(v)))}'>"
            f"{html.escape(fmt.format(float(v))) if math.isfinite(float(v)) else ''}</td>" for v in values[r])
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return (f"<table><caption>{html.escape(caption)}</caption><tr><th></th>{head}</tr>{''.join(body)}</table>")


def bar_rows(items: Sequence[tuple[str, float]], caption: str) -> str:
    """Signed horizontal bars (HTML only) for a short list of labelled numbers."""
    vmax = max((abs(v) for _, v in items), default=1.0) or 1.0
    rows = []
    for label, v in items:
        w = int(200 * abs(v) / vmax)
        color = "#d62728" if v >= 0 else "#1f77b4"
        rows.append(f"<tr><td class='t'>{html.escape(label)}</td><td style='text-align:right'>{v:+.3f}</td>"
                    f"<td><div style='width:{w}px;height:10px;background:{color}'></div></td></tr>")
    return f"<table><caption>{html.escape(caption)}</caption>{''.join(rows)}</table>"


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def line_chart(x_labels: Sequence[str], series: dict[str, Sequence[float]], caption: str, log_y: bool = False,
               width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart (one line per series, legend, hover titles); non-finite points are skipped."""
    def tf(v: float) -> float:
        return math.log10(max(v, 1e-6)) if log_y else v
    vals = [tf(float(v)) for s in series.values() for v in s if math.isfinite(float(v))]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(1, len(x_labels) - 1)
    left, right, top, bottom = 66, 12, 12, 40

    def xy(i: int, v: float) -> tuple[float, float]:
        return (left + (width - left - right) * i / n, top + (height - top - bottom) * (1 - (tf(v) - lo) / (hi - lo)))
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
             f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}' fill='none' stroke='#ccc'/>"]
    for frac in (0.0, 0.5, 1.0):
        yv = lo + (hi - lo) * frac
        y = top + (height - top - bottom) * (1 - frac)
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        parts.append(f"<text x='{left - 4}' y='{y + 4:.1f}' font-size='10' text-anchor='end'>{html.escape(label)}</text>")
    step = max(1, len(x_labels) // 12)
    for i, lab in enumerate(x_labels):
        if i % step == 0 or i == len(x_labels) - 1:
            x, _ = xy(i, lo)
            parts.append(f"<text x='{x:.1f}' y='{height - bottom + 14}' font-size='10' text-anchor='middle'>"
                         f"{html.escape(lab)}</text>")
    for k, (name, ys) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [(i, float(v)) for i, v in enumerate(ys) if math.isfinite(float(v))]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in pts))
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{path}'/>")
        for i, v in pts:
            x, y = xy(i, v)
            parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{color}'><title>"
                         f"{html.escape(f'{name} {x_labels[i]}: {v:.4g}')}</title></circle>")
        parts.append(f"<text x='{left + 8 + 140 * k}' y='{height - 8}' font-size='11' fill='{color}'>"
                     f"\u25cf {html.escape(name)}</text>")
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption class='small'>{html.escape(caption)}</figcaption></figure>"
