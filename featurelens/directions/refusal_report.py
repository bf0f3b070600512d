"""The refusal pipeline's HTML report."""

from __future__ import annotations

from typing import Any


def _report(out: Any, res: Any, model_name: str) -> None:
    """Write report.html for a RefusalResult (``res``)."""
    import html

    from featurelens.evaluation.report import _plt, write_page

    plt = _plt()
    img = ""
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for ax, key, label in zip(axes, ("bypass", "induce", "kl"), ("bypass score (lower: less refusal)",
                                                                    "induce score (higher: more refusal)", "KL on harmless")):
            for pos in sorted({c.position for c in res.candidates}):
                cs = [c for c in res.candidates if c.position == pos]
                ax.plot([c.layer for c in cs], [getattr(c, key) for c in cs], marker=".", label=f"pos {pos}")
            ax.axvline(res.layer, color="k", ls=":")
            ax.set_xlabel("layer")
            ax.set_title(label, fontsize=9)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "candidates.png", dpi=110)
        plt.close(fig)
        img = '<img src="candidates.png" alt="candidate scores by layer">'
    m = res.metrics
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in m.items()
                   if k not in ("examples", "still_refused", "refusal_tokens", "refined", "behaviour", "search"))
    img += _behaviour_table(m.get("behaviour")) + _search_table(m.get("search"))
    ref = m.get("refined")
    if ref:
        hist = "".join(f"<tr><td>{h['step']}</td><td>{h['bypass']:+.3f}</td><td>{h['induce']:+.3f}</td><td>{h['kl']:.4f}</td>"
                       f"<td>{h['value']:.4f}</td></tr>" for h in ref["history"])
        rows += (f"<tr><td>refinement</td><td>from layer {ref['start']['layer']} position {ref['start']['position']}, "
                 f"best step {ref['best_step']} of {ref['steps']}, cosine to start {ref['cos_to_start']:.3f}</td></tr>")
        img += ("<h2>Refinement (validation prompts)</h2><table><tr><th>step</th><th>bypass</th><th>induce</th>"
                f"<th>KL</th><th>objective</th></tr>{hist}</table>")
    ex = "".join(f"<tr><td>{html.escape(e['prompt'])}</td><td>{html.escape(e['before'])}</td><td>{html.escape(e['after'])}</td></tr>"
                 for e in m.get("examples", []))
    still = "".join(f"<tr><td>{html.escape(e['prompt'])}</td><td>{html.escape(e['after'])}</td></tr>"
                    for e in m.get("still_refused", []))
    if still:
        ex += ("</table><h2>Test harmful prompts still refused after ablation</h2><table><tr><th>prompt</th>"
               f"<th>after ablation</th></tr>{still}")
    write_page(out / "report.html", f"refusal direction: {model_name}",
               f"<h1>Refusal direction of {html.escape(model_name)}</h1>"
               f"<p>chosen: layer {res.layer}, position {res.position}</p><table>{rows}</table>{img}"
               f"<h2>Examples (test harmful)</h2><table><tr><th>prompt</th><th>before</th><th>after ablation</th></tr>"
               f"{ex}</table>")


def _behaviour_table(b: dict[str, Any] | None) -> str:
    """Refusal / non-answer rates on the held-out behaviour sets and the capability check, before and after."""
    if not b:
        return ""
    rows = ""
    for name, label in (("harmful", "harmful (held-out topics)"), ("twins", "harmless twins"),
                        ("borderline", "borderline benign")):
        cells = "".join(f"<td>{_fmt(b[w][name]['refusal'])}</td><td>{_fmt(b[w][name]['non_answer'])}</td>"
                        for w in ("before", "after"))
        rows += f"<tr><td>{label}</td>{cells}</tr>"
    cap = ""
    if "capability" in b["before"]:
        cap = (f"<p>capability check (multiple choice, {b['before']['capability']['n']} questions): "
               f"{_fmt(b['before']['capability']['accuracy'])} before, {_fmt(b['after']['capability']['accuracy'])} after "
               f"({b['summary'].get('capability_change_points', 0):+.1f} points)</p>")
    warn = "<p><b>The edit added false refusals.</b></p>" if b["summary"].get("adds_false_refusals") else ""
    return ("<h2>Over-refusal (three-way judge, held-out test splits)</h2><table><tr><th>set</th><th>refusal before</th>"
            f"<th>non-answer before</th><th>refusal after</th><th>non-answer after</th></tr>{rows}</table>{cap}{warn}")


def _search_table(sr: dict[str, Any] | None) -> str:
    """The search's Pareto front (validation prompts)."""
    if not sr:
        return ""
    import html

    front = [t for t in sr["trials"] if t["number"] in set(sr["front"])]
    rows = "".join(f"<tr><td>{t['number']}{' (chosen)' if t['number'] == sr['chosen'] else ''}</td>"
                   f"<td>{t['refusals']}/{t['n']}</td><td>{t['kl']:.4f}</td><td>{_fmt(t['capability'])}</td>"
                   f"<td>{html.escape(_fmt({k: round(v, 3) if isinstance(v, float) else v for k, v in t['params'].items()}))}</td></tr>"
                   for t in sorted(front, key=lambda t: (t["refusals"], t["kl"])))
    return (f"<h2>Search: Pareto front of {len(sr['trials'])} trials ({html.escape(sr['sampler'])}, validation prompts)</h2>"
            f"<table><tr><th>trial</th><th>refusals</th><th>KL</th><th>capability</th><th>parameters</th></tr>{rows}</table>")


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "rate" in v:
        return f"{v['rate']:.3f} ({v['k']}/{v['n']}, 95% CI {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f})"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
