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
