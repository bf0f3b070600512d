"""``featurelens lens`` and ``featurelens patch``: one prompt (or a clean/corrupted pair) in, a report out."""

from __future__ import annotations

import html
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from featurelens.errors import UsageError
from featurelens.lens.attribution import direct_logit_attribution
from featurelens.lens.logit_lens import logit_lens
from featurelens.lens.patching import (
    ablate_heads,
    attribution_patching,
    head_patching,
    logit_diff_metric,
    patching_grid,
)
from featurelens.lens.report import bar_rows, token_heatmap, value_heatmap
from featurelens.lens.tuned import row_label
from featurelens.models.loading import LoadedModel, load_model
from featurelens.models.sites import SITE_KINDS, SiteMap


@dataclass
class LensConfig:
    """Logit lens and direct logit attribution of one prompt."""

    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    prompt: str = "The Eiffel Tower is in the city of"
    """The text to read (tokenized as is, with the tokenizer's special tokens)."""
    target: str = ""
    """Token to follow and attribute (its first token, e.g. ' Paris'); empty: the model's own top prediction."""
    minus: str = ""
    """Attribute the logit difference target - minus instead of the target's logit."""
    top: int = 10
    """Heads and neurons listed in the report."""
    tuned: str = ""
    """A tuned lens (the folder `featurelens lens train` wrote) to show beside the logit lens."""
    out: str = "runs/lens"
    """Output folder for lens.json and report.html."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("top",))
        check_device(self.device)
        if not self.prompt.strip():
            raise UsageError("--prompt is empty: give the text to read")


@dataclass
class PatchConfig:
    """Activation patching of a clean / corrupted prompt pair, with attribution patching beside it."""

    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    clean: str = "When John and Mary went to the shops, John gave the bag to"
    """Prompt on which the model shows the behaviour."""
    corrupt: str = "When John and Mary went to the shops, Mary gave the bag to"
    """Same number of tokens, the behaviour broken."""
    answer: str = " Mary"
    """Correct next token on the clean prompt (its first token)."""
    wrong: str = " John"
    """Competing token; the metric is logit[answer] - logit[wrong] at the last position."""
    kinds: str = "hook_resid_pre,hook_attn_out,hook_mlp_out"
    """Comma-separated site kinds to patch, each over every layer and position."""
    attribution: bool = True
    """Also estimate each grid by attribution patching and report how close it is."""
    heads: bool = True
    """Also patch every attention head (its whole output) and confirm the top heads by ablating them."""
    n_heads: int = 3
    """How many top heads to ablate together on the clean prompt (next to as many random heads)."""
    out: str = "runs/patch"
    """Output folder for patch.json and report.html."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device

        check_device(self.device)
        if self.n_heads <= 0:
            raise UsageError(f"--n-heads {self.n_heads} is invalid: it must be a positive number (> 0)")
        for k in self.kind_list():
            if k not in SITE_KINDS:
                raise UsageError(f"--kinds: {k!r} is not a site kind: use {', '.join(SITE_KINDS)}")
        if not self.kind_list():
            raise UsageError("--kinds is empty: give at least one site kind")
        for flag in ("clean", "corrupt", "answer", "wrong"):
            if not getattr(self, flag).strip():
                raise UsageError(f"--{flag} is empty")

    def kind_list(self) -> list[str]:
        return [k.strip() for k in self.kinds.split(",") if k.strip()]


def _encode(lm: LoadedModel, text: str) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.to(lm.device)


def _first_token(lm: LoadedModel, text: str, flag: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError(f"--{flag} {text!r} encodes to no tokens")
    if len(ids) > 1:
        print(f"note: --{flag} {text!r} is {len(ids)} tokens; using the first, "
              f"{lm.tokenizer.decode(ids[:1])!r}", file=sys.stderr)
    return int(ids[0])


def _decode(lm: LoadedModel, ids: list[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


def run_lens(cfg: LensConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Write the logit-lens heat map, per-layer KL and the DLA of the target under ``cfg.out``."""
    from featurelens.atomic import atomic_write_bytes
    from featurelens.evaluation.report import write_page
    from featurelens.jsonio import dumps_strict
    from featurelens.outputs import check_out, make_out, output_lock

    check_out(cfg.out, "lens-report")
    with output_lock(cfg.out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        ids = _encode(lm, cfg.prompt)
        tuned = None
        if cfg.tuned:
            from featurelens.lens.tuned import TunedLens

            tuned = TunedLens.load(cfg.tuned, lm.model)
        lens = logit_lens(lm.model, ids)
        top_ids, top_p = lens.top(1)
        target = _first_token(lm, cfg.target, "target") if cfg.target else int(top_ids[-1, -1, 0])
        minus = _first_token(lm, cfg.minus, "minus") if cfg.minus else None
        dla = direct_logit_attribution(lm.model, ids, target, minus)
        sm = SiteMap(lm.model)
        heads = sorted(((f"L{i}.H{h}", float(dla.heads[i, h])) for i in range(sm.n_layers) for h in range(sm.n_heads)),
                       key=lambda t: -abs(t[1]))[: cfg.top]
        neurons = sorted(((f"L{i}.N{j}", float(dla.neurons[i, j])) for i in range(sm.n_layers) for j in range(sm.d_mlp)),
                         key=lambda t: -abs(t[1]))[: cfg.top]
        words = _decode(lm, ids[0].tolist())
        summary = {
            "config": asdict(cfg), "model": lm.name, "tokens": words, "target": lm.tokenizer.decode([target]),
            "minus": lm.tokenizer.decode([minus]) if minus is not None else None,
            "layers": lens.labels,
            "top_token": [[lm.tokenizer.decode([int(t)]) for t in row] for row in top_ids[..., 0]],
            "top_prob": top_p[..., 0].tolist(), "target_prob": lens.prob(target).tolist(),
            "kl_to_final_last": lens.kl_to_final[:, -1].tolist(), "kl_to_final_mean": lens.kl_to_final.mean(1).tolist(),
            "dla": {"target": dla.target, "value": dla.value, "total": dla.total, "constant": dla.constant,
                    "components": dla.components, "top_heads": heads, "top_neurons": neurons},
        }
        extra = ""
        if tuned is not None:
            tl = logit_lens(lm.model, ids, translate=tuned.translate)
            t_ids, t_p = tl.top(1)
            trained = {row_label(s) for s in tuned.sites}
            t_labels = [lab if lab in trained or lab == lens.labels[-1] else f"{lab} (untrained)" for lab in tl.labels]
            summary["tuned"] = {"lens": cfg.tuned, "rows_trained": sorted(trained, key=tl.labels.index),
                                "top_token": [[lm.tokenizer.decode([int(t)]) for t in row] for row in t_ids[..., 0]],
                                "top_prob": t_p[..., 0].tolist(), "target_prob": tl.prob(target).tolist(),
                                "kl_to_final_mean": tl.kl_to_final.mean(1).tolist()}
            from featurelens.lens.report import line_chart

            extra = (token_heatmap(t_labels, words, summary["tuned"]["top_token"], t_p[..., 0],
                                   "tuned lens: top token of each translated residual stream")
                     + line_chart(lens.labels, {"logit lens": summary["kl_to_final_mean"],
                                                "tuned lens": summary["tuned"]["kl_to_final_mean"]},
                                  "KL(final || layer) averaged over this prompt's positions, nats (log scale)", log_y=True))
        out = make_out(cfg.out, "lens-report")
        atomic_write_bytes(out / "lens.json", dumps_strict(summary).encode())
        kl_rows = [(name, float(v)) for name, v in zip(lens.labels, lens.kl_to_final[:, -1])]
        body = (f"<h1>logit lens: {html.escape(lm.name)}</h1><p class='t'>{html.escape(cfg.prompt)}</p>"
                + token_heatmap(lens.labels, words, summary["top_token"], top_p[..., 0],
                                "top token of each layer's residual stream read through the final norm and unembedding")
                + value_heatmap(lens.labels, words, lens.prob(target),
                                f"probability of {lm.tokenizer.decode([target])!r} per layer and position", "{:.2f}")
                + bar_rows(kl_rows, "KL(final || layer) at the last position, nats") + extra
                + f"<h2>direct logit attribution of {html.escape(repr(summary['target']))}"
                + (f" minus {html.escape(repr(summary['minus']))}" if minus is not None else "") + "</h2>"
                + f"<p class='small'>value {dla.value:.3f} = components {dla.total - dla.constant:.3f} + constant "
                  f"{dla.constant:.3f}; through the final norm frozen at this pass</p>"
                + bar_rows(list(dla.components.items()), "embeddings and each block's attention / MLP")
                + bar_rows(heads, f"top {cfg.top} heads") + bar_rows(neurons, f"top {cfg.top} neurons"))
        write_page(out / "report.html", f"logit lens: {lm.name}", body)
    summary["report"] = str(Path(cfg.out) / "report.html")
    return summary


def _heads_section(lm: LoadedModel, clean: torch.Tensor, corrupt: torch.Tensor, metric: Any, cfg: PatchConfig,
                   body: list[str]) -> dict[str, Any]:
    """Patch every head; ablate the top ``cfg.n_heads`` on the clean prompt, and as many random ones."""
    sm = SiteMap(lm.model)
    res = head_patching(lm.model, clean, corrupt, metric)
    norm = res.normalized
    order = sorted(((float(norm[i, h]), i, h) for i in range(sm.n_layers) for h in range(sm.n_heads)
                    if torch.isfinite(norm[i, h])), reverse=True)
    top = [(i, h) for _, i, h in order[: cfg.n_heads]]
    gen = torch.Generator().manual_seed(0)
    pool = [(i, h) for i in range(sm.n_layers) for h in range(sm.n_heads) if (i, h) not in top]
    rand = [pool[int(j)] for j in torch.randperm(len(pool), generator=gen)[: cfg.n_heads]]
    with torch.no_grad():
        with ablate_heads(lm.model, top):
            ablated = float(metric(lm.model(input_ids=clean, use_cache=False).logits))
        with ablate_heads(lm.model, rand):
            control = float(metric(lm.model(input_ids=clean, use_cache=False).logits))
    name = lambda hs: ", ".join(f"L{i}.H{h}" for i, h in hs)  # noqa: E731
    body.append("<h2>attention heads</h2>" + value_heatmap(
        [f"L{i}" for i in range(sm.n_layers)], [f"H{h}" for h in range(sm.n_heads)], norm,
        "patching each head's output (all positions): restored fraction"))
    from featurelens.lens.attention import attention_patterns

    pat = attention_patterns(lm.model, clean)
    words = _decode(lm, clean[0].tolist())
    last_row = torch.stack([pat[i, h, -1] for i, h in top])
    body.append(value_heatmap([f"L{i}.H{h}" for i, h in top], words, last_row,
                              "where the top heads look from the last position (attention probability)"))
    body.append(f"<p>Ablating the top heads ({html.escape(name(top))}) on the clean prompt moves the metric from "
                f"{res.clean:.3f} to <b>{ablated:.3f}</b>; ablating {cfg.n_heads} random heads "
                f"({html.escape(name(rand))}) moves it to {control:.3f}.</p>")
    return {"scores": res.scores.tolist(), "normalized": norm.tolist(), "top": [f"L{i}.H{h}" for i, h in top],
            "top_restored": [v for v, _, _ in order[: cfg.n_heads]], "clean": res.clean,
            "ablated_top": ablated, "ablated_random": control, "random": [f"L{i}.H{h}" for i, h in rand],
            "top_attention_from_last": last_row.tolist()}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    m = torch.isfinite(a) & torch.isfinite(b)
    x, y = a[m].double(), b[m].double()
    if x.numel() < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def run_patch(cfg: PatchConfig, lm: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Patch every (layer, position) of each site kind; write heat maps and the estimates' agreement."""
    from featurelens.atomic import atomic_write_bytes
    from featurelens.evaluation.report import write_page
    from featurelens.jsonio import dumps_strict
    from featurelens.outputs import check_out, make_out, output_lock

    check_out(cfg.out, "patch-report")
    with output_lock(cfg.out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        clean, corrupt = _encode(lm, cfg.clean), _encode(lm, cfg.corrupt)
        if clean.shape != corrupt.shape:
            raise UsageError(f"--clean is {clean.shape[1]} tokens and --corrupt {corrupt.shape[1]}: patching needs "
                             "the same length; reword one of them")
        metric = logit_diff_metric(_first_token(lm, cfg.answer, "answer"), _first_token(lm, cfg.wrong, "wrong"))
        sm = SiteMap(lm.model)
        words = _decode(lm, clean[0].tolist())
        kinds = cfg.kind_list()
        bar = tqdm(total=len(kinds) * sm.n_layers * clean.shape[1], desc="patch", unit="run", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        results: dict[str, Any] = {}
        body = [f"<h1>activation patching: {html.escape(lm.name)}</h1>",
                f"<p class='t'>clean: {html.escape(cfg.clean)}<br>corrupt: {html.escape(cfg.corrupt)}</p>"]
        rows = [f"L{i}" for i in range(sm.n_layers)]
        for kind in kinds:
            real = patching_grid(lm.model, clean, corrupt, metric, kind=kind, progress=bar.update)
            entry: dict[str, Any] = {"clean": real.clean, "corrupt": real.corrupt, "scores": real.scores.tolist(),
                                     "normalized": real.normalized.tolist()}
            body.append(f"<h2>{html.escape(kind)}</h2><p class='small'>metric clean {real.clean:.3f}, corrupt "
                        f"{real.corrupt:.3f}; cell = (patched - corrupt) / (clean - corrupt)</p>")
            body.append(value_heatmap(rows, words, real.normalized, f"patching {kind}: restored fraction"))
            if cfg.attribution:
                est = attribution_patching(lm.model, clean, corrupt, metric, kind=kind)
                entry["attribution_normalized"] = est.normalized.tolist()
                entry["attribution_corr"] = _pearson(est.scores, real.scores)
                entry["attribution_max_abs_err"] = float((est.normalized - real.normalized).abs().nan_to_num().max())
                body.append(value_heatmap(rows, words, est.normalized,
                                          f"attribution patching estimate (Pearson r with real patching "
                                          f"{entry['attribution_corr']:.3f})"))
            results[kind] = entry
        bar.close()
        summary = {"config": asdict(cfg), "model": lm.name, "tokens": words, "kinds": results}
        if cfg.heads:
            summary["heads"] = _heads_section(lm, clean, corrupt, metric, cfg, body)
        out = make_out(cfg.out, "patch-report")
        atomic_write_bytes(out / "patch.json", dumps_strict(summary).encode())
        write_page(out / "report.html", f"activation patching: {lm.name}", "".join(body))
    summary["report"] = str(Path(cfg.out) / "report.html")
    return summary
